"""Loaders and verifiers the task YAMLs here name with ``!function utils.<name>``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

from joyai_megatron.rl.rewards.math_answer import math_reward

TASK_DIR = Path(__file__).parent


def load_jsonl(file: str, **_: Any) -> dict[str, datasets.Dataset]:
    """The ``test`` split from a JSONL file beside the YAMLs (or an absolute path): no hub access."""
    path = Path(file) if Path(file).is_absolute() else TASK_DIR / file
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}


def process_math(doc: dict[str, Any], results: list[Any]) -> dict[str, float]:
    """pass@1 (mean over samples) and pass@k (any of the k samples right) with the RL math verifier."""
    responses = results[0] if results and isinstance(results[0], list) else results
    correct = [math_reward(r, str(doc["answer"])) for r in responses]
    return {"pass@1": sum(correct) / len(correct), f"pass@{len(correct)}": float(max(correct))}
