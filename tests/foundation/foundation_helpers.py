"""Helpers shared by the foundation and pretraining tests: paths, the CLI, the tiny mock recipe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY_BASE = REPO / "recipes" / "pretrain" / "tiny_cpu" / "base.yaml"

# Megatron's MockGPTDataset instead of the demo corpus: no tokenizer or data_prep run needed.
MOCK_DATA = [
    "data.mock=true",
    "data.tokenizer=''",
    "data.blend=null",
    "train.eval_interval=0",
    "logging.tensorboard=false",
]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m joyai_megatron ARGS`` in a fresh interpreter, from the repository root."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, "-m", "joyai_megatron", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tiny_overrides(root: Path, *extra: str) -> list[str]:
    """Overrides that point the tiny CPU recipe at mock data and at ``root`` for every output."""
    return [
        *MOCK_DATA,
        f"data.cache_dir={root / 'cache'}",
        f"checkpoint.dir={root / 'checkpoints'}",
        f"logging.dir={root / 'logs'}",
        *extra,
    ]


def load_tiny(root: Path, *extra: str):
    from joyai_megatron.config.recipe import load_recipe

    return load_recipe(TINY_BASE, tiny_overrides(root, *extra))
