"""The shared launcher without the trainer: shellcheck, DRY_RUN at 32 x 8 GPUs, hostlists,
submit.sh flag mapping, and rank variables / SIGUSR1 / requeue on a real slurmctld."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.slurm.slurmci import PYTHON, REPO, SlurmCluster, job_output

pytestmark = pytest.mark.slurm

SLURM_DIR = REPO / "slurm"
SHELL_SCRIPTS = sorted(
    [*SLURM_DIR.glob("*.sbatch"), *SLURM_DIR.glob("*.sh"), *SLURM_DIR.glob("lib/*.sh")]
    + [*(REPO / "tests" / "slurm").glob("*.sh"), *(REPO / "tests" / "slurm").glob("*.sbatch")]
)
STAGE_SCRIPTS = ["pretrain_48b", "sft_48b", "dpo_48b", "fiberpo_48b", "qat_48b", "convert_to_hf", "data_prep"]


def clean_env(**extra: str) -> dict[str, str]:
    """No Slurm job context and no reachable slurm.conf: what a laptop or login node has."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(SLURM_CONF="/nonexistent/slurm.conf", PYTHON="python")
    env.update(extra)
    return env


def dry_run(script: str, nodes: int = 32, args: list[str] | None = None, **extra: str) -> str:
    env = clean_env(
        DRY_RUN="1",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME=f"joyai-{script}",
        SLURM_JOB_NUM_NODES=str(nodes),
        SLURM_JOB_NODELIST=f"gpu[001-{nodes:03d}]",
        LOG_ROOT="/tmp/joyai-dry-run-must-not-exist",
        **extra,
    )
    proc = subprocess.run(
        ["bash", str(SLURM_DIR / f"{script}.sbatch"), *(args or [])],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=60,
    )
    assert proc.returncode == 0, (
        f"DRY_RUN of {script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )
    assert not Path("/tmp/joyai-dry-run-must-not-exist").exists(), "DRY_RUN created the log directory"
    return proc.stdout


def command_lines(out: str, program: str) -> list[str]:
    """The commands DRY_RUN printed for PROGRAM, unquoted, words joined by single spaces."""
    return [" ".join(shlex.split(line[2:])) for line in out.splitlines() if line.startswith(f"+ {program} ")]


def test_shellcheck_passes_on_every_script(slurm_tools: None) -> None:
    assert len(SHELL_SCRIPTS) >= 11, SHELL_SCRIPTS
    proc = subprocess.run(
        ["shellcheck", "-x", "--severity=style", *map(str, SHELL_SCRIPTS)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dry_run_pretrain_32_nodes_of_8_gpus() -> None:
    out = dry_run("pretrain_48b", args=["train.global_batch_size=4096"])
    assert "layout: 32 node(s) x 8 rank(s)/node = world size 256 (gpu mode)" in out
    node_lines = re.findall(r"node (gpu\d{3}) NODE_RANK (\d+): RANK (\d+)-(\d+) LOCAL_RANK 0-7", out)
    assert len(node_lines) == 32
    for i, (host, node_rank, first, last) in enumerate(node_lines):
        assert (host, int(node_rank), int(first), int(last)) == (f"gpu{i + 1:03d}", i, 8 * i, 8 * i + 7)
    assert "+ export MASTER_ADDR=gpu001" in out
    port = int(re.search(r"\+ export MASTER_PORT=(\d+)", out).group(1))
    assert 20000 <= port < 50000
    assert "+ export NCCL_NVLS_ENABLE=0" in out
    assert "+ export CUDA_DEVICE_MAX_CONNECTIONS=1" in out

    (plan,) = command_lines(out, "python")
    recipe = "recipes/pretrain/joyai_48b_a3b/stage1.yaml"
    assert plan.startswith(f"python -m joyai_megatron plan {recipe} ")
    assert plan.endswith(" train.global_batch_size=4096 --nodes 32 --gpus-per-node 8")

    (srun,) = command_lines(out, "srun")
    argv = srun.split()
    for flag in ("--nodes=32", "--ntasks=256", "--ntasks-per-node=8", "--kill-on-bad-exit=1"):
        assert flag in argv, srun
    assert not any(a.startswith("--container") for a in argv), "container flags without CONTAINER_IMAGE"
    tail = argv[argv.index("bash") :]
    assert tail[:8] == [
        "bash",
        str(SLURM_DIR / "lib" / "rank_exec.sh"),
        "python",
        "-m",
        "joyai_megatron",
        "pretrain",
        recipe,
        "logging.dir=/tmp/joyai-dry-run-must-not-exist/joyai-pretrain_48b-4242",
    ]
    assert tail[-1] == "train.global_batch_size=4096"
    assert not command_lines(out, "scontrol"), "DRY_RUN without a signal must not requeue"


def test_dry_run_env_overrides_container_and_skip_preflight() -> None:
    out = dry_run(
        "pretrain_48b",
        nodes=4,
        PRETRAIN_STAGE="4_64k",
        CONTAINER_IMAGE="nvcr.io/nvidia/pytorch:25.10-py3",
        CONTAINER_MOUNTS="/lustre:/lustre",
        NCCL_NVLS_ENABLE="1",
        MASTER_PORT="31337",
        SKIP_PREFLIGHT="1",
        CHECKPOINT_DIR="/lustre/ckpt/s3",
        LOAD_CHECKPOINT="/lustre/ckpt/s2",
        TRAIN_ITERS="100",
        SAVE_INTERVAL="50",
        OVERRIDES="optim.lr=1e-4 train.seed=7",
        SRUN_ARGS="--cpu-bind=none",
    )
    assert "world size 32" in out
    assert "+ export NCCL_NVLS_ENABLE=1" in out
    assert "+ export MASTER_PORT=31337" in out
    assert "preflight skipped (SKIP_PREFLIGHT=1)" in out
    assert not command_lines(out, "python"), "SKIP_PREFLIGHT=1 still ran plan"
    (srun,) = command_lines(out, "srun")
    argv = srun.split()
    assert "--container-image=nvcr.io/nvidia/pytorch:25.10-py3" in argv
    assert f"--container-mounts={REPO}:{REPO},/lustre:/lustre" in argv
    assert f"--container-workdir={REPO}" in argv
    assert "--cpu-bind=none" in argv
    assert "recipes/pretrain/joyai_48b_a3b/stage4_64k.yaml" in argv
    for override in (
        "checkpoint.dir=/lustre/ckpt/s3",
        "checkpoint.load=/lustre/ckpt/s2",
        "train.train_iters=100",
        "checkpoint.save_interval=50",
        "optim.lr=1e-4",
        "train.seed=7",
    ):
        assert override in argv, srun

    out = dry_run("pretrain_48b", nodes=4, PLAN_ARGS="--gpu-memory-gb 141")
    (plan,) = command_lines(out, "python")
    assert plan.endswith("--nodes 4 --gpus-per-node 8 --gpu-memory-gb 141")


def test_dry_run_cpu_mode_uses_tiny_recipe_and_gloo() -> None:
    out = dry_run("pretrain_48b", nodes=1, GPUS_PER_NODE="0", NTASKS_PER_NODE="2")
    assert "layout: 1 node(s) x 2 rank(s)/node = world size 2 (cpu mode)" in out
    assert "+ export CUDA_VISIBLE_DEVICES=''" in out
    assert "NCCL_NVLS_ENABLE" not in out
    (plan,) = command_lines(out, "python")
    assert plan.startswith("python -m joyai_megatron plan recipes/pretrain/tiny_cpu/stage1.yaml ")
    assert plan.endswith(" --nodes 1 --gpus-per-node 2")
    (srun,) = command_lines(out, "srun")
    assert "--ntasks=2" in srun.split() and "--ntasks-per-node=2" in srun.split()


@pytest.mark.parametrize(
    ("script", "entry"),
    [
        ("sft_48b", "-m joyai_megatron sft recipes/sft/joyai_48b_a3b.yaml"),
        ("dpo_48b", "-m joyai_megatron dpo recipes/dpo/joyai_48b_a3b.yaml"),
        ("fiberpo_48b", "-m joyai_megatron rl recipes/rl/joyai_48b_a3b_fiberpo.yaml"),
        ("qat_48b", "-m joyai_megatron qat recipes/qat/joyai_48b_a3b_int4.yaml"),
    ],
)
def test_dry_run_post_training_stages(script: str, entry: str) -> None:
    recipe = entry.split()[-1]
    if not (REPO / recipe).exists():
        pytest.skip(f"{recipe} does not exist yet (stage recipe not written)")
    out = dry_run(script, nodes=8)
    assert "world size 64" in out
    (srun,) = command_lines(out, "srun")
    assert entry in srun and "--ntasks=64" in srun.split()
    (plan,) = command_lines(out, "python")
    assert f"plan {recipe} " in plan and plan.endswith(" --nodes 8 --gpus-per-node 8")


def test_dry_run_convert_and_data_prep(tmp_path: Path) -> None:
    out = dry_run("convert_to_hf", nodes=1, CHECKPOINT_DIR="/ckpt/qat", HF_OUTPUT_DIR="/export/hf")
    (srun,) = command_lines(out, "srun")
    assert "--ntasks=1" in srun.split()
    assert srun.endswith(
        "python -m joyai_megatron.convert to-hf --checkpoint /ckpt/qat --output /export/hf --no-progress"
    )
    assert "+ export CUDA_VISIBLE_DEVICES=''" in out

    shards = [tmp_path / f"part-{i:02d}.jsonl" for i in range(7)]
    for shard in shards:
        shard.write_text("{}\n")
    chunks = []
    for task in range(3):
        out = dry_run(
            "data_prep",
            nodes=1,
            INPUT_GLOB=str(tmp_path / "part-*.jsonl"),
            TOKENIZER="/tok",
            OUTPUT_PREFIX=str(tmp_path / "out" / "web"),
            SLURM_ARRAY_TASK_ID=str(task + 10),
            SLURM_ARRAY_TASK_MIN="10",
            SLURM_ARRAY_TASK_COUNT="3",
            SLURM_CPUS_PER_TASK="4",
        )
        (srun,) = command_lines(out, "srun")
        argv = srun.split()
        assert argv[argv.index("-m") : argv.index("--input") + 1] == [
            "-m",
            "data_prep",
            "pretrain",
            "--input",
        ]
        chunks.append(argv[argv.index("--input") + 1 : argv.index("--tokenizer")])
        assert argv[argv.index("--tokenizer") :] == [
            "--tokenizer",
            "/tok",
            "--output-prefix",
            f"{tmp_path}/out/web_{task:05d}",
            "--workers",
            "4",
            "--no-progress",
        ]
    # Every file exactly once, in order, in chunks of 2, 2 and 3; nothing written by DRY_RUN.
    assert [len(c) for c in chunks] == [2, 2, 3]
    assert sum(chunks, []) == [str(s) for s in shards]
    assert not (tmp_path / "out").exists()


def test_dry_run_missing_recipe_is_a_clear_error() -> None:
    env = clean_env(
        DRY_RUN="1", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="n[1-2]", RECIPE="recipes/nope.yaml"
    )
    proc = subprocess.run(
        ["bash", str(SLURM_DIR / "pretrain_48b.sbatch")], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 1
    assert "recipe not found: recipes/nope.yaml" in proc.stderr


def test_hostlist_fallback_matches_scontrol(slurm_cluster: SlurmCluster) -> None:
    lists = ["gpu[001-003,010]", "a1,b[2-3],c", "rack[1-2]-n[08-10]", "n[9-11],m[098-101]", "solo"]
    for hostlist in lists:
        expected = slurm_cluster.run(["scontrol", "show", "hostnames", hostlist]).stdout.split()
        script = f'source "{SLURM_DIR}/lib/launch.sh"; jm_expand_hostlist "$1"'
        fallback = subprocess.run(
            ["bash", "-c", script, "bash", hostlist],
            capture_output=True,
            text=True,
            env=clean_env(),
            check=True,
        ).stdout.split()
        assert fallback == expected, hostlist


def test_submit_maps_environment_to_sbatch_flags(tmp_path: Path) -> None:
    env = clean_env(
        DRY_RUN="1",
        NNODES="64",
        GPUS_PER_NODE="8",
        JOB_DEPENDENCY="singleton",
        LOG_ROOT=str(tmp_path),
        SBATCH_ARGS="--reservation=big --exclude=gpu007",
    )
    proc = subprocess.run(
        ["bash", str(SLURM_DIR / "submit.sh"), "pretrain_48b", "train.seed=3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("+ sbatch ")]
    assert shlex.split(line)[1:] == [
        "sbatch",
        "--parsable",
        "--nodes=64",
        "--gpus-per-node=8",
        "--ntasks-per-node=8",
        "--dependency=singleton",
        f"--output={tmp_path}/%x-%j.out",
        "--reservation=big",
        "--exclude=gpu007",
        str(SLURM_DIR / "pretrain_48b.sbatch"),
        "train.seed=3",
    ]

    # data_prep: one array task per input file unless SBATCH_ARRAY_INX says otherwise.
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.jsonl").write_text("{}\n")
    env.update(INPUT_GLOB=str(tmp_path / "*.jsonl"), GPUS_PER_NODE="0", NNODES="1")
    proc = subprocess.run(
        ["bash", str(SLURM_DIR / "submit.sh"), "data_prep"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stderr.splitlines()[-1])
    assert "--array=0-2" in argv and f"--output={tmp_path}/%x-%A_%a.out" in argv


def test_ranks_signal_requeue_and_max_restarts(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """SIGUSR1 to the batch shell reaches both ranks, they exit 0, the job requeues itself once;
    the second SIGUSR1 finds MAX_RESTARTS=1 used up and the job stops with exit 75."""
    env = slurm_cluster.job_env(tmp_path, MAX_RESTARTS="1", PROBE_SECONDS="90", PYTHON=PYTHON)
    out_file = tmp_path / "probe.out"
    job_id = slurm_cluster.sbatch(
        [
            "--ntasks-per-node=2",
            "--gpus-per-node=0",
            f"--output={out_file}",
            str(REPO / "tests" / "slurm" / "rank_probe.sbatch"),
        ],
        env,
    )
    for restart in (0, 1):
        # Both ranks of this run are up (their USR1 handler is installed) before the signal.
        slurm_cluster.wait_for_text(out_file, rf"restart {restart}/1(.|\n)*0: probe RANK=0 ready", 60, job_id)
        slurm_cluster.wait_for_text(out_file, rf"restart {restart}/1(.|\n)*1: probe RANK=1 ready", 60, job_id)
        slurm_cluster.run(["scancel", "--batch", "--signal=USR1", job_id])
        if restart == 0:
            slurm_cluster.wait_for_text(out_file, r"restart 1/1", 60, job_id)
    job = slurm_cluster.wait(job_id, 60)
    out = job_output(slurm_cluster, job)
    assert (job.state, job.exit_code, job.restarts) == ("FAILED", "75:0", 1), slurm_cluster.diagnostics(
        job_id
    )

    first, second = out.split("restart 1/1", 1)
    for rank in (0, 1):
        assert (
            f"{rank}: probe RANK={rank} WORLD_SIZE=2 LOCAL_RANK={rank} LOCAL_WORLD_SIZE=2 NODE_RANK=0"
            in first
        )
        assert f"{rank}: probe RANK={rank} got SIGUSR1" in first
        assert f"{rank}: probe RANK={rank} got SIGUSR1" in second
    assert "MASTER_ADDR=localhost" in first
    assert "SIGUSR1: forwarding to srun" in first
    assert "requeueing job" in first and "+ scontrol requeue" in first
    assert "reached MAX_RESTARTS=1: not requeueing" in second
    assert "timed out" not in out
    ports = re.findall(r"\+ export MASTER_PORT=(\d+)", out)
    assert len(ports) == 2 and ports[0] != ports[1], "a requeued run must not reuse the rendezvous port"
