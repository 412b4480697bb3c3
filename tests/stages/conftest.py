"""Session fixtures for the SFT and DPO tests: demo data, a short pretraining run, and the tiny
SFT run (the demo's recipe) whose checkpoint the DPO tests start from."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.joyai_helpers import SFT_RECIPE, TINY_BASE
from tests.stages.stage_helpers import Run, data_overrides, run_stage, sft_overrides


@pytest.fixture(scope="session")
def stages_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stages")


@pytest.fixture(scope="session")
def demo_data(stages_root: Path) -> Path:
    """``data_prep demo`` output (tokenizer, pretraining blend, SFT and DPO sets) in ~10 s."""
    from data_prep.demo import build_demo

    build_demo(stages_root / "data", progress=False)
    return stages_root / "data"


@pytest.fixture(scope="session")
def pretrain_run(stages_root: Path, demo_data: Path) -> Run:
    """A few pretraining steps with the dense MTP block on: a real checkpoint to fine-tune."""
    return run_stage(
        "pretrain",
        TINY_BASE,
        stages_root / "pretrain",
        [
            *data_overrides(demo_data),
            f"data.blend={demo_data / 'blend.yaml'}",
            "model.mtp_enabled=true",
            "train.train_iters=4",
            "train.eval_interval=0",
            "scheduler.warmup_tokens=0",
            "checkpoint.save_interval=0",
        ],
    )


@pytest.fixture(scope="session")
def sft_run(stages_root: Path, demo_data: Path, pretrain_run: Run) -> Run:
    """The tiny SFT recipe, unchanged except for where it reads and writes."""
    return run_stage(
        "sft", SFT_RECIPE, stages_root / "sft", sft_overrides(demo_data, pretrain_run.checkpoint_dir)
    )


@pytest.fixture(scope="module")
def rl_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny RL task's tokenizer and prompts (test_rl.py, test_rl_replay.py)."""
    from tests.stages.rl_fixtures import rl_test_data

    return rl_test_data(tmp_path_factory.mktemp("rl_data"))


@pytest.fixture
def shutdown():
    """Tear down the process group a test's in-process stage started."""
    yield
    from joyai_megatron.training.distributed import shutdown as close

    close()
