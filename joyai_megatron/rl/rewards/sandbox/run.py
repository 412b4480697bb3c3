"""Run model-written Python against reference tests, or on a stdin, with the verdict out of its reach.

``run_python_tests`` starts two sandboxed processes joined by two pipes: the solution's (the only
one that executes model code; runtime/solution.py) and the judge's (runs the tests, calling the
program's functions through the channel; runtime/judge.py). The judge writes its verdict to a
third pipe that only it and this process hold. ``run_python_program`` runs a program on a given
stdin; the caller judges its stdout. Both keep the trainer's process free of model code, apply
the limits of runtime/limits.py and a wall clock, and delete every file of the run afterwards.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from joyai_megatron.rl.rewards.sandbox.isolation import (
    PYTHON,
    RUNTIME_DIR,
    SANDBOX_INPUT,
    SANDBOX_RUNTIME,
    bwrap_command,
    sandbox_env,
    sandbox_uid,
    use_isolation,
)

OUTPUT_TAIL = 4000
MAX_STDOUT_BYTES = 1024 * 1024
_MAX_FILE_BYTES = 16 * 1024 * 1024
_PROCESSES = 16  # per sandboxed process tree: threads count too
_JUDGE_MEMORY_MB = 1024
# No environment variables, no user site; the judge also skips ``site`` (a few ms per start), the
# program keeps it (``exit()`` / ``quit()`` are common in stdin/stdout solutions).
_FLAGS = {"solution": ("-E", "-s"), "judge": ("-E", "-S")}


@dataclass(frozen=True)
class SandboxResult:
    """A test run: passed only if the judge ran every test line without an exception in time."""

    passed: bool
    timed_out: bool
    output: str  # the program's output tail, then the judge's reason for a failure


@dataclass(frozen=True)
class ProgramRun:
    """A program run on a given stdin."""

    returncode: int | None  # None when killed at the wall clock
    timed_out: bool
    stdout: str  # at most MAX_STDOUT_BYTES
    stderr: str  # the tail


def _limits(timeout_s: float, memory_mb: int) -> dict:
    return {
        "memory_bytes": memory_mb * 1024 * 1024,
        "cpu_seconds": math.ceil(timeout_s) + 1,
        "file_bytes": _MAX_FILE_BYTES,
        "processes": _PROCESSES,
    }


def _spawn(
    role: str, source: Path, config: dict, isolated: bool, work: Path, streams: tuple, pass_fds: tuple = ()
) -> subprocess.Popen:
    """Start runtime/<role>.py on ``source``, inside bubblewrap when ``isolated``."""
    if isolated:
        inside = f"{SANDBOX_INPUT}/{source.name}"
        config = {**config, "source": inside, "uid": sandbox_uid()}
        argv = [PYTHON, *_FLAGS[role], f"{SANDBOX_RUNTIME}/{role}.py", json.dumps(config)]
        command, cwd, env = bwrap_command(argv, {str(source): inside}), None, {}
    else:
        scratch = work / f"{role}_scratch"
        scratch.mkdir()
        config = {**config, "source": str(source), "uid": None}
        command = [PYTHON, *_FLAGS[role], str(RUNTIME_DIR / f"{role}.py"), json.dumps(config)]
        cwd, env = scratch, sandbox_env(str(scratch))
    stdin, stdout, stderr = streams
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdin=stdin, stdout=stdout, stderr=stderr,
        pass_fds=pass_fds, start_new_session=True,
    )  # fmt: skip


def _wait(process: subprocess.Popen, timeout_s: float) -> bool:
    """Wait up to the wall clock; True if it ran out. A pidfd wakes us the moment the process
    exits (``Popen.wait(timeout)`` polls with sleeps of up to 50 ms, a third of a verification).
    ``poll``, not ``select``: a trainer holds many files, and select() fails on descriptors >= 1024."""
    pidfd = os.pidfd_open(process.pid)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        exited = bool(poller.poll(max(timeout_s, 0.0) * 1000))
    finally:
        os.close(pidfd)
    if exited:
        process.wait()
    return not exited


def _kill(process: subprocess.Popen) -> None:
    """SIGKILL the process group; under bubblewrap that ends the PID namespace and all in it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o644)  # readable by the sandbox's own uid
    return path


def _tail(stream: IO[bytes], limit: int = OUTPUT_TAIL) -> str:
    stream.seek(0, os.SEEK_END)
    stream.seek(max(0, stream.tell() - limit))
    return stream.read().decode("utf-8", errors="replace").rstrip("\n")


def run_python_tests(
    solution: str,
    tests: str,
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    isolated: bool | None = None,
) -> SandboxResult:
    """Judge ``solution`` with assert-style ``tests`` that use its top-level names.

    isolated: None = bubblewrap when usable (else refuse, unless unsafe execution is allowed);
    True = require it; False = run unisolated (only with unsafe execution allowed).
    """
    isolated = use_isolation(isolated)
    with tempfile.TemporaryDirectory(prefix="joyai_sandbox_") as tmp:
        work = Path(tmp)
        program, test_file = _write(work / "solution.py", solution), _write(work / "tests.py", tests)
        requests_r, requests_w = os.pipe()
        replies_r, replies_w = os.pipe()
        verdict_r, verdict_w = os.pipe()
        limits = _limits(timeout_s, memory_mb)
        judge_limits = _limits(timeout_s, _JUDGE_MEMORY_MB)
        with (
            open(verdict_r, "rb") as verdict_pipe,
            open(work / "solution.log", "w+b") as log,
            open(work / "judge.log", "w+b") as judge_log,
        ):
            processes: list[subprocess.Popen] = []
            try:
                try:  # os.pipe() descriptors are not inherited: each process gets exactly its own
                    solution_fds = (requests_r, replies_w)
                    config = {**limits, "mode": "functions", "fds": list(solution_fds)}
                    streams = (subprocess.DEVNULL, log, subprocess.STDOUT)
                    processes.append(
                        _spawn("solution", program, config, isolated, work, streams, solution_fds)
                    )
                    judge_fds = (replies_r, requests_w, verdict_w)
                    config = {**judge_limits, "fds": list(judge_fds)}
                    streams = (subprocess.DEVNULL, judge_log, subprocess.STDOUT)
                    processes.append(_spawn("judge", test_file, config, isolated, work, streams, judge_fds))
                finally:
                    for fd in (requests_r, requests_w, replies_r, replies_w, verdict_w):
                        os.close(fd)
                timed_out = _wait(processes[1], timeout_s)
            finally:
                for process in processes:
                    _kill(process)
            raw = verdict_pipe.read(65536)
            output = _tail(log)
            judge_output = _tail(judge_log)
    try:
        verdict = json.loads(raw)
    except ValueError:
        verdict = None
    if not isinstance(verdict, dict):
        verdict = {"passed": False, "error": "the judge gave no verdict"}
    passed = not timed_out and verdict.get("passed") is True
    reason = "wall-clock limit reached" if timed_out else str(verdict.get("error", ""))
    if not passed:
        output = "\n".join(part for part in (output, judge_output, f"judge: {reason}") if part)
    return SandboxResult(passed=passed, timed_out=timed_out, output=output)


def run_python_program(
    solution: str,
    stdin: str,
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    isolated: bool | None = None,
) -> ProgramRun:
    """Run ``solution`` as ``__main__`` on ``stdin``; the caller compares its stdout."""
    isolated = use_isolation(isolated)
    with tempfile.TemporaryDirectory(prefix="joyai_sandbox_") as tmp:
        work = Path(tmp)
        program = _write(work / "solution.py", solution)
        _write(work / "stdin.txt", stdin)
        config = {**_limits(timeout_s, memory_mb), "mode": "script"}
        with (
            open(work / "stdin.txt", "rb") as given,
            open(work / "stdout.txt", "w+b") as out,
            open(work / "stderr.txt", "w+b") as err,
        ):
            process = _spawn("solution", program, config, isolated, work, (given, out, err))
            try:
                timed_out = _wait(process, timeout_s)
            finally:
                _kill(process)
            out.seek(0)
            stdout = out.read(MAX_STDOUT_BYTES).decode("utf-8", errors="replace")
            stderr = _tail(err)
    return ProgramRun(None if timed_out else process.returncode, timed_out, stdout, stderr)
