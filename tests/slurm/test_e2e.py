"""The sbatch scripts end to end on a live slurmctld, in CPU mode (GPUS_PER_NODE=0, 2 gloo ranks),
running the real trainer, converter and data preparation."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.slurm.slurmci import PYTHON, REPO, Job, SlurmCluster, assert_completed, job_output, require_trainer

pytestmark = pytest.mark.slurm

# Synthetic batches (Megatron's MockGPTDataset) and no tokenizer: these tests are about the
# launch, not the data, and must not depend on runs/demo having been built. micro_batch_size=1:
# tiny_cpu/stage1's batch ramp (4 -> 8 by 2) needs mbs*dp to divide 2 on 2 ranks.
MOCK_DATA = "data.mock=true data.tokenizer='' train.micro_batch_size=1"
JOB_TIMEOUT = 600  # generous: a shared 2-core machine can be many times slower than idle


def step_lines(text: str) -> list[tuple[int, int, float]]:
    """(step, total, loss) of every trainer log line `step N/M | ... | loss X | ...` (srun-labelled)."""
    found = re.findall(r"^\d+: step (\d+)/(\d+) \|.*?\| loss ([0-9.naninf]+) \|", text, re.MULTILINE)
    return [(int(s), int(t), float(loss)) for s, t, loss in found]


def training_env(
    cluster: SlurmCluster, root: Path, checkpoint_dir: Path, iters: int, overrides: str, **extra: str
) -> dict[str, str]:
    """A training script's job environment: logs under ``root/logs``, one log line per step."""
    return cluster.job_env(
        root / "logs",
        CHECKPOINT_DIR=str(checkpoint_dir),
        TRAIN_ITERS=str(iters),
        LOG_INTERVAL="1",
        OVERRIDES=overrides,
        **extra,
    )


def tracker(checkpoint_dir: Path) -> int:
    return int((checkpoint_dir / "latest_checkpointed_iteration.txt").read_text().strip())


@dataclass
class PretrainRun:
    job: Job
    output: str
    checkpoint_dir: Path
    log_root: Path


@pytest.fixture(scope="module")
def pretrain_run(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> PretrainRun:
    """pretrain_48b.sbatch in CPU mode: 2 ranks, 4 steps, a checkpoint every 2 steps."""
    require_trainer()
    root = tmp_path_factory.mktemp("pretrain")
    checkpoint_dir = root / "ckpt"
    env = training_env(
        slurm_cluster, root, checkpoint_dir, 4, f"{MOCK_DATA} data.cache_dir={root / 'cache'}",
        SAVE_INTERVAL="2",
        SBATCH_TIMELIMIT="00:20:00",  # sbatch's own input variable beats the script's `#SBATCH --time`
        SUBMIT_PREFLIGHT="1",
    )  # fmt: skip
    job_id = slurm_cluster.submit("pretrain_48b", env)
    job = slurm_cluster.wait(job_id, JOB_TIMEOUT)
    return PretrainRun(job, assert_completed(slurm_cluster, job), checkpoint_dir, root / "logs")


def test_pretrain_job_trains_and_checkpoints(slurm_cluster: SlurmCluster, pretrain_run: PretrainRun) -> None:
    out, job = pretrain_run.output, pretrain_run.job
    diag = slurm_cluster.diagnostics(job.job_id)
    assert job.info["TimeLimit"] == "00:20:00", diag
    assert job.restarts == 0
    assert "layout: 1 node(s) x 2 rank(s)/node = world size 2 (cpu mode)" in out, diag
    assert "preflight: checking that the layout of recipes/pretrain/tiny_cpu/stage1.yaml fits 1 x 2" in out
    assert re.search(
        r"^\+ \S+ -m joyai_megatron plan recipes/pretrain/tiny_cpu/stage1.yaml .* --nodes 1 --gpus-per-node 2$",
        out,
        re.M,
    )
    assert "preflight failed" not in out and "preflight skipped" not in out

    steps = step_lines(out)
    assert [s for s, _, _ in steps] == [1, 2, 3, 4], diag
    assert all(total == 4 for _, total, _ in steps)
    assert all(0 < loss < 20 for _, _, loss in steps), steps
    assert "from scratch at step 0" in out
    assert "finished at step 4" in out, diag
    assert "srun exited with status 0" in out
    assert f"latest complete checkpoint: iteration 4 in {pretrain_run.checkpoint_dir}" in out

    ckpt = pretrain_run.checkpoint_dir
    assert tracker(ckpt) == 4
    assert (ckpt / "iter_0000004").is_dir() and (ckpt / "iter_0000002").is_dir()
    # One log directory per job: the launch record and the trainer's logging.dir.
    job_log_dir = pretrain_run.log_root / f"joyai-pretrain-{job.job_id}"
    launch = (job_log_dir / "launch.txt").read_text()
    assert "restart 0 started" in launch and "restart 0 srun status 0" in launch
    assert "MASTER_ADDR=localhost" in launch and "WORLD_SIZE=2" in launch
    assert (job_log_dir / "recipe.yaml").is_file(), sorted(p.name for p in job_log_dir.iterdir())


def test_preemption_checkpoints_requeues_and_resumes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """USR1 to the batch shell (what --signal=B:USR1@secs does before the time limit): the ranks
    save and exit 0, the job requeues itself, and the new run resumes after the saved step."""
    require_trainer()
    checkpoint_dir = tmp_path / "ckpt"
    total = 60  # long enough that the signal lands mid-run even on a fast idle machine
    overrides = f"{MOCK_DATA} data.cache_dir={tmp_path / 'cache'}"
    env = training_env(
        slurm_cluster, tmp_path, checkpoint_dir, total, overrides, SAVE_INTERVAL="0", MAX_RESTARTS="2"
    )
    job_id = slurm_cluster.submit("pretrain_48b", env)
    out_file = Path(slurm_cluster.job(job_id).info["StdOut"])
    # Training is under way (the signal handler is installed before the first step).
    slurm_cluster.wait_for_text(out_file, r"^\d+: step 2/", JOB_TIMEOUT, job_id)
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", job_id])
    job = slurm_cluster.wait(job_id, 2 * JOB_TIMEOUT)
    out = assert_completed(slurm_cluster, job)
    diag = slurm_cluster.diagnostics(job_id)
    assert job.restarts == 1, diag

    first, _, second = out.partition(f"job {job_id} (joyai-pretrain) restart 1/2")
    assert second, f"no second run in the output\n{diag}"
    assert "SIGUSR1: forwarding to srun" in first, diag
    saved = int(re.search(r"\[pretrain\] signal at step (\d+); checkpoint", first).group(1))
    assert 2 <= saved < total, saved
    assert f"latest complete checkpoint: iteration {saved} in {checkpoint_dir}" in first
    assert "requeueing job" in first
    assert (checkpoint_dir / f"iter_{saved:07d}").is_dir()

    assert "resumed from" in second and f"at step {saved}" in second, diag
    resumed_steps = [s for s, _, _ in step_lines(second)]
    assert resumed_steps == list(range(saved + 1, total + 1)), resumed_steps
    assert f"finished at step {total}" in second
    assert tracker(checkpoint_dir) == total


def test_preflight_stops_a_layout_that_does_not_fit(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """The 48B recipe (PP=2 x EP=8) cannot run on 2 ranks: submit.sh refuses before queueing, and
    a direct sbatch fails in the job's preflight without starting any rank."""
    require_trainer()
    recipe = "recipes/pretrain/joyai_48b_a3b/stage1.yaml"
    env = slurm_cluster.job_env(tmp_path / "logs", RECIPE=recipe, SUBMIT_PREFLIGHT="1")
    proc = slurm_cluster.run(
        ["bash", str(REPO / "slurm" / "submit.sh"), "pretrain_48b"], env=env, check=False, timeout=300
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    reason = "world size 2 is not divisible by etp*ep*pp = 1*8*2 = 16"  # the planner's own words
    assert "preflight failed; nothing was submitted" in proc.stderr
    assert reason in proc.stderr
    assert proc.stdout.strip() == "", "submit.sh printed a job id for a rejected layout"

    out_file = tmp_path / "direct.out"
    job_id = slurm_cluster.sbatch(
        [
            "--nodes=1",
            "--ntasks-per-node=2",
            "--gpus-per-node=0",
            f"--output={out_file}",
            str(REPO / "slurm" / "pretrain_48b.sbatch"),
        ],
        env,
    )
    job = slurm_cluster.wait(job_id, JOB_TIMEOUT)
    out = job_output(slurm_cluster, job)
    assert (job.state, job.exit_code) == ("FAILED", "1:0"), slurm_cluster.diagnostics(job_id)
    assert "preflight failed: the layout does not fit this allocation" in out
    assert reason in out
    assert "+ srun" not in out, "ranks were launched despite a failed preflight"


def test_convert_job_exports_hf(
    slurm_cluster: SlurmCluster, pretrain_run: PretrainRun, tmp_path: Path
) -> None:
    hf_dir = tmp_path / "hf"
    env = slurm_cluster.job_env(
        tmp_path / "logs", CHECKPOINT_DIR=str(pretrain_run.checkpoint_dir), HF_OUTPUT_DIR=str(hf_dir)
    )
    job = slurm_cluster.wait(slurm_cluster.submit("convert_to_hf", env), JOB_TIMEOUT)
    out = assert_completed(slurm_cluster, job)
    assert "world size 1 (cpu mode)" in out
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3"
    assert list(hf_dir.glob("*.safetensors")), sorted(p.name for p in hf_dir.iterdir())


def test_data_prep_array_tokenizes_every_shard(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "while",
        "slurm",
        "schedules",
        "tokenizer",
        "jobs",
    ]
    for shard in range(3):
        with open(raw / f"part-{shard}.jsonl", "w") as f:
            for doc in range(20):
                text = " ".join(words[(doc + k + shard) % len(words)] for k in range(30))
                f.write(json.dumps({"text": text}) + "\n")
    tokenizer = tmp_path / "tokenizer"
    slurm_cluster.run(
        [
            PYTHON,
            "-m",
            "data_prep",
            "train-tokenizer",
            "--input",
            *map(str, sorted(raw.iterdir())),
            "--output",
            str(tokenizer),
            "--vocab-size",
            "300",
        ],
        env=slurm_cluster.job_env(tmp_path),
        timeout=120,
    )
    env = slurm_cluster.job_env(
        tmp_path / "logs",
        INPUT_GLOB=str(raw / "part-*.jsonl"),
        TOKENIZER=str(tokenizer),
        OUTPUT_PREFIX=str(tmp_path / "tok" / "web"),
        WORKERS="1",
    )
    array_id = slurm_cluster.submit("data_prep", env)
    for task in range(3):
        job = slurm_cluster.wait(f"{array_id}_{task}", JOB_TIMEOUT)
        out = assert_completed(slurm_cluster, job)
        assert f"array task {task} of 3: files {task}..{task} of 3" in out
        for ext in ("bin", "idx"):
            path = tmp_path / "tok" / f"web_{task:05d}.{ext}"
            assert path.is_file() and path.stat().st_size > 0, sorted((tmp_path / "tok").iterdir())


@pytest.fixture(scope="module")
def demo_data(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's tokenizer and SFT / DPO / RL sets (`python -m data_prep demo`)."""
    out = tmp_path_factory.mktemp("demo") / "data"
    slurm_cluster.run(
        [PYTHON, "-m", "data_prep", "demo", "--output", str(out)], env=slurm_cluster.job_env(out), timeout=600
    )
    return out


def stage_overrides(stage: str, data: Path) -> str:
    """Point a tiny post-training recipe at the demo data instead of runs/demo, without LR
    warm-up (2 steps cannot hold it)."""
    per_stage = {
        "sft": f"data.sft_path={data / 'sft/train.parquet'} sft.valid_path={data / 'sft/eval.parquet'}",
        "dpo": f"data.dpo_path={data / 'dpo/train.parquet'} dpo.valid_path={data / 'dpo/eval.parquet'}",
        "rl": f"data.rl_path={data / 'rl/train.jsonl'} rl.eval_path={data / 'rl/eval.jsonl'}",
    }
    per_stage["qat"] = per_stage["sft"]  # QAT trains on the SFT chat data (qat.data: sft)
    return f"data.tokenizer={data / 'tokenizer'} scheduler.warmup_tokens=0 {per_stage[stage]}".strip()


# Which earlier stage's checkpoint each stage starts from (LOAD_CHECKPOINT -> checkpoint.load), as
# in the recipes. SFT starts from fresh weights: the demo's MTP-enabled pretraining stage 4 is not
# built here.
STARTS_FROM = {"sft": None, "dpo": "sft", "rl": "sft", "qat": "sft"}
STAGE_CHECKPOINTS: dict[str, Path] = {}


def step_numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"^\d+: step (\d+)/\d+ \|", text, re.MULTILINE)]


STAGES = [
    ("sft_48b", "sft", "recipes/sft/tiny_cpu.yaml", "joyai_megatron/stages/sft.py"),
    ("dpo_48b", "dpo", "recipes/dpo/tiny_cpu.yaml", "joyai_megatron/stages/dpo.py"),
    ("fiberpo_48b", "rl", "recipes/rl/tiny_cpu.yaml", "joyai_megatron/stages/rl.py"),
    ("qat_48b", "qat", "recipes/qat/tiny_cpu.yaml", "joyai_megatron/stages/qat.py"),
]


@pytest.mark.parametrize(("script", "stage", "recipe", "module"), STAGES, ids=[s[1] for s in STAGES])
def test_post_training_stage_job(
    slurm_cluster: SlurmCluster,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    script: str,
    stage: str,
    recipe: str,
    module: str,
) -> None:
    """Each post-training script trains 2 steps of its tiny_cpu recipe on 2 ranks, from the
    previous stage's checkpoint as the pipeline does, and checkpoints."""
    require_trainer()
    missing = [p for p in (recipe, module) if not (REPO / p).exists()]
    if missing:
        pytest.skip(f"stage '{stage}' does not exist yet: missing {', '.join(missing)}")
    parent = STARTS_FROM[stage]
    if parent is not None and parent not in STAGE_CHECKPOINTS:
        pytest.skip(f"stage '{stage}' starts from the '{parent}' checkpoint, whose test did not pass")
    data: Path = request.getfixturevalue("demo_data")  # built only when a stage exists
    checkpoint_dir = tmp_path / "ckpt"
    overrides = stage_overrides(stage, data) + ("" if parent else " checkpoint.load=null")
    env = training_env(slurm_cluster, tmp_path, checkpoint_dir, 2, overrides)
    if parent is not None:
        env["LOAD_CHECKPOINT"] = str(STAGE_CHECKPOINTS[parent])
    job = slurm_cluster.wait(slurm_cluster.submit(script, env), JOB_TIMEOUT)
    out = assert_completed(slurm_cluster, job)
    diag = slurm_cluster.diagnostics(job.job_id)
    assert f"-m joyai_megatron {stage} {recipe}" in out
    if parent is not None:
        assert f"checkpoint.load={STAGE_CHECKPOINTS[parent]}" in out
    assert step_numbers(out) == [1, 2], diag
    assert "finished at step 2" in out, diag
    assert tracker(checkpoint_dir) == 2
    assert (checkpoint_dir / "iter_0000002").is_dir()
    STAGE_CHECKPOINTS[stage] = checkpoint_dir
