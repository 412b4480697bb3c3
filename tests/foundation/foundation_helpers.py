"""Helpers shared by the foundation and pretraining tests: the tiny recipe on Megatron's mock data
(paths and the CLI runner: tests/joyai_helpers.py)."""

from __future__ import annotations

from pathlib import Path

from tests.joyai_helpers import TINY_BASE

# Megatron's MockGPTDataset instead of the demo corpus: no tokenizer or data_prep run needed.
MOCK_DATA = [
    "data.mock=true",
    "data.tokenizer=''",
    "data.blend=null",
    "train.eval_interval=0",
    "logging.tensorboard=false",
]


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


def tiny_trainer(root: Path, *extra: str):
    """A fresh one-rank pretraining Trainer on the tiny recipe (the process's earlier world left
    and shut down first); the caller shuts it down."""
    from joyai_megatron.stages.pretrain import PretrainStage
    from joyai_megatron.training.distributed import shutdown
    from joyai_megatron.training.trainer import Trainer
    from tests.joyai_helpers import leave_launcher_world

    leave_launcher_world()
    shutdown()
    return Trainer(load_tiny(root, *extra), PretrainStage)
