"""A real single-node Slurm cluster (slurmctld + slurmd on localhost) for the sbatch tests.

conftest.py's session fixtures install Debian's slurm-wlm when missing (tests/slurm/setup_slurm.sh), writes
a config into a temporary directory (auth none, proctrack linuxproc, CPUs=2, free ports, short
requeue delay), starts both daemons, and stops every job and daemon at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.joyai_helpers import REPO

SETUP_SCRIPT = REPO / "tests" / "slurm" / "setup_slurm.sh"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable))
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
# Pending reasons that no amount of waiting fixes on a one-node test cluster.
HOPELESS_REASONS = {"PartitionConfig", "BadConstraints", "PartitionNodeLimit", "InvalidAccount", "InvalidQOS"}
TRAINER_MAIN = REPO / "joyai_megatron" / "__main__.py"


def require_trainer() -> None:
    """Skip a test that runs the real trainer when the trainer package has no entry point yet."""
    if not TRAINER_MAIN.exists():
        pytest.skip(f"needs the trainer: {TRAINER_MAIN.relative_to(REPO)} does not exist yet")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _real_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        total_kb = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
    return max(256, min(4000, total_kb // 1024 - 256))


def _tail(path: Path, lines: int = 60) -> str:
    if not path.exists():
        return f"<{path} does not exist>"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


@dataclass
class Job:
    job_id: str
    info: dict[str, str] = field(default_factory=dict)

    @property
    def state(self) -> str:
        return self.info.get("JobState", "UNKNOWN")

    @property
    def exit_code(self) -> str:
        return self.info.get("ExitCode", "?")

    @property
    def restarts(self) -> int:
        return int(self.info.get("Restarts", "0"))


class SlurmCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.log_dir = root / "log"
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        # A job inherits the submitting environment (--export=ALL): keep a parent job's out.
        for key in list(self.env):
            if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and key != "SLURM_CONF":
                del self.env[key]

    def write_config(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        r = self.root
        self.conf.write_text(
            f"""ClusterName=joyaici
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
# A requeued job may start again cred_expire+1 s later (default 120, minimum 5).
AuthInfo=cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Re-run the scheduler every 2 s so a requeued job starts once eligible (defaults: 60 s / 30 s).
SchedulerParameters=sched_interval=2,bf_interval=1
ReturnToService=2
MinJobAge=1800
KillWait=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory={_real_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
        )

    def start(self, timeout: float = 60) -> None:
        self.write_config()
        for argv, name in (
            (["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld"),
            (["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)], "slurmd"),
        ):
            out = open(self.log_dir / f"{name}.stdout", "w")  # noqa: SIM115 (closed with the process)
            self.procs.append(
                subprocess.Popen(
                    argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
                )
            )
            time.sleep(1.0)
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"a Slurm daemon exited early ({proc.args}):\n{self.diagnostics()}")
            state = self.run(["sinfo", "-h", "-o", "%t"], check=False).stdout.strip()
            if state in ("idle", "mix", "alloc"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"node never became idle (sinfo: {state!r}):\n{self.diagnostics()}")

    def stop(self) -> None:
        if shutil.which("scancel"):
            self.run(["scancel", "--user", "root"], check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.run(["squeue", "-h"], check=False).stdout.strip():
                time.sleep(0.5)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def run(self, argv: list[str], check: bool = True, env: dict | None = None, timeout: float = 60):
        proc = subprocess.run(
            argv, capture_output=True, text=True, env=env or self.env, timeout=timeout, cwd=REPO
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def job_env(self, log_root: Path, **extra: str) -> dict[str, str]:
        """Environment of a CPU-mode submission: 1 node x 2 gloo ranks, the repo's venv Python."""
        env = dict(
            self.env,
            PYTHON=PYTHON,
            GPUS_PER_NODE="0",
            NTASKS_PER_NODE="2",
            NNODES="1",
            CPUS_PER_TASK="1",
            # The job's own preflight always runs; the submit-time one (a second planner start) is
            # switched on only by the tests about it.
            SUBMIT_PREFLIGHT="0",
            LOG_ROOT=str(log_root),
            REPO_DIR=str(REPO),
        )
        env.update(extra)
        return env

    def submit(self, script: str, env: dict[str, str], args: list[str] | None = None) -> str:
        """slurm/submit.sh SCRIPT: returns the job id."""
        # The submit-time preflight imports the trainer's planner: slow on a loaded machine.
        proc = self.run(
            ["bash", str(REPO / "slurm" / "submit.sh"), script, *(args or [])],
            env=env,
            check=False,
            timeout=300,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"submit.sh {script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc.stdout.strip().splitlines()[-1].split(";")[0]

    def sbatch(self, argv: list[str], env: dict[str, str]) -> str:
        proc = self.run(["sbatch", "--parsable", *argv], env=env)
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> Job:
        out = self.run(["scontrol", "-o", "show", "job", job_id], check=False).stdout
        return Job(job_id, dict(re.findall(r"(\w+)=(\S*)", out)))

    def wait(self, job_id: str, timeout: float) -> Job:
        """Wait for a terminal state (a requeued job passes through PENDING again on the way)."""
        deadline = time.monotonic() + timeout
        job = self.job(job_id)
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job.state in TERMINAL_STATES:
                return job
            if job.state == "PENDING" and job.info.get("Reason") in HOPELESS_REASONS:
                raise AssertionError(
                    f"job {job_id} can never start here ({job.info['Reason']})\n{self.diagnostics(job_id)}"
                )
            time.sleep(0.5)
        raise AssertionError(
            f"job {job_id} still {job.state} after {timeout:.0f} s\n{self.diagnostics(job_id)}"
        )

    def wait_for_text(self, path: Path, pattern: str, timeout: float, job_id: str | None = None) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                match = re.search(pattern, path.read_text(errors="replace"), re.MULTILINE)
                if match:
                    return match
            if job_id and self.job(job_id).state in TERMINAL_STATES:
                break
            time.sleep(0.3)
        raise AssertionError(f"/{pattern}/ never appeared in {path}\n{self.diagnostics(job_id)}")

    def diagnostics(self, job_id: str | None = None) -> str:
        parts = []
        if job_id:
            job = self.job(job_id)
            parts.append(f"--- scontrol show job {job_id}: {job.info}")
            stdout = job.info.get("StdOut")
            if stdout:
                parts.append(f"--- job output {stdout}:\n{_tail(Path(stdout), 200)}")
        for name in ("slurmctld.log", "slurmd.log"):
            parts.append(f"--- {name}:\n{_tail(self.log_dir / name, 40)}")
        return "\n".join(parts)


def job_output(cluster: SlurmCluster, job: Job) -> str:
    path = Path(job.info.get("StdOut", ""))
    assert path.is_file(), f"job {job.job_id} has no output file {path}\n{cluster.diagnostics(job.job_id)}"
    return path.read_text(errors="replace")


def assert_completed(cluster: SlurmCluster, job: Job) -> str:
    """The job ended COMPLETED with exit 0:0; returns its output."""
    if job.state != "COMPLETED" or job.exit_code != "0:0":
        raise AssertionError(
            f"job {job.job_id} ended {job.state} exit {job.exit_code}\n{cluster.diagnostics(job.job_id)}"
        )
    return job_output(cluster, job)
