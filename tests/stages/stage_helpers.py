"""Helpers for the SFT/DPO tests: in-process training runs and the overrides that point the tiny
recipes at a test's own data and directories.

Runs go through ``joyai_megatron.cli.run_stage`` in the test process (the code path of
``python -m joyai_megatron`` minus ~10 s of imports per run); each run tears its process groups down.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Run:
    """A finished in-process training run."""

    checkpoint_dir: Path
    log_dir: Path
    history: list[dict[str, Any]]
    seconds: float


def run_stage(stage: str, recipe: Path, root: Path, overrides: list[str]) -> Run:
    """Train ``stage`` with checkpoints and logs under ``root``; returns its per-step history."""
    from joyai_megatron.cli import run_stage as cli_run_stage

    started = time.time()
    result = cli_run_stage(
        stage,
        str(recipe),
        [
            f"checkpoint.dir={root / 'ckpt'}",
            f"logging.dir={root / 'logs'}",
            "logging.tensorboard=false",
            "logging.interval=1",
            *overrides,
        ],
    )
    return Run(root / "ckpt", root / "logs", result["history"], time.time() - started)


def data_overrides(data: Path) -> list[str]:
    return [
        f"data.tokenizer={data / 'tokenizer'}",
        f"data.cache_dir={data / 'cache'}",
    ]


def sft_overrides(data: Path, load: Path) -> list[str]:
    return [
        *data_overrides(data),
        f"data.sft_path={data / 'sft' / 'train.parquet'}",
        f"sft.valid_path={data / 'sft' / 'eval.parquet'}",
        f"checkpoint.load={load}",
    ]


def dpo_overrides(data: Path, load: Path) -> list[str]:
    return [
        *data_overrides(data),
        f"data.dpo_path={data / 'dpo' / 'train.parquet'}",
        f"dpo.valid_path={data / 'dpo' / 'eval.parquet'}",
        f"checkpoint.load={load}",
    ]


def rewind_checkpoints(src: Path, dst: Path, iteration: int) -> None:
    """``dst``: a copy of the checkpoint directory ``src`` as a run killed right after saving
    ``iteration`` left it (the next checkpoint removed, the tracker pointing at ``iteration``)."""
    import shutil

    shutil.copytree(src, dst)
    shutil.rmtree(dst / f"iter_{iteration + 1:07d}")
    (dst / "latest_checkpointed_iteration.txt").write_text(str(iteration))


def assert_same_step_metrics(again: dict[str, Any], expected: dict[str, Any]) -> None:
    """A resumed step logs what the uninterrupted run logged (timings and throughput aside)."""
    import pytest

    for key, value in expected.items():
        if key.startswith(("stage/time/", "tokens_per_s", "tflops")):
            continue
        assert again[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
