"""Dataset blends: a YAML of weighted IndexedDataset prefixes -> Megatron-Core's blend.

Format (relative prefixes resolve against the YAML file's directory; weights need not sum to 1,
Megatron-Core normalises them)::

    datasets:
      - prefix: pretrain/topics_text   # PREFIX.bin and PREFIX.idx must exist
        weight: 3
      - prefix: /data/web/cc_0001
        weight: 1.5

``load_blend`` returns ``(prefixes, weights)``, the ``blend=`` argument of
``BlendedMegatronDatasetConfig``; ``data_path_args`` gives the ``--data-path w1 p1 w2 p2`` list.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from data_prep.errors import DataPrepError

_ITEM_KEYS = {"prefix", "weight"}


class BlendError(DataPrepError):
    """A blend file problem, naming the file and the key."""


def load_blend(path: str | Path) -> tuple[list[str], list[float]]:
    """Absolute prefixes and positive weights, after checking every ``.bin``/``.idx`` exists."""
    path = Path(path)
    try:
        data: Any = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise BlendError(f"{path}: cannot read blend: {exc}") from exc
    if not isinstance(data, dict) or set(data) != {"datasets"}:
        raise BlendError(f"{path}: expected a mapping with exactly one key 'datasets'")
    items = data["datasets"]
    if not isinstance(items, list) or not items:
        raise BlendError(f"{path}: datasets: expected a non-empty list")
    prefixes, weights = [], []
    for k, item in enumerate(items):
        where = f"{path}: datasets[{k}]"
        if not isinstance(item, dict):
            raise BlendError(f"{where}: expected a mapping with 'prefix' and 'weight'")
        if set(item) != _ITEM_KEYS:
            extra, missing = sorted(set(item) - _ITEM_KEYS), sorted(_ITEM_KEYS - set(item))
            raise BlendError(
                f"{where}: " + (f"unknown key {extra[0]!r}" if extra else f"missing key {missing[0]!r}")
            )
        prefix, weight = item["prefix"], item["weight"]
        if not isinstance(prefix, str) or not prefix:
            raise BlendError(f"{where}.prefix: expected a non-empty string")
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not math.isfinite(weight)
            or weight <= 0
        ):
            raise BlendError(f"{where}.weight: expected a positive number, got {weight!r}")
        resolved = Path(prefix) if Path(prefix).is_absolute() else path.parent / prefix
        for suffix in (".bin", ".idx"):
            if not Path(f"{resolved}{suffix}").is_file():
                raise BlendError(f"{where}.prefix: {resolved}{suffix} does not exist")
        prefixes.append(str(resolved.resolve()))
        weights.append(float(weight))
    return prefixes, weights


def data_path_args(prefixes: list[str], weights: list[float]) -> list[str]:
    """Megatron's ``--data-path`` form: ``[w1, p1, w2, p2, ...]`` as strings."""
    return [value for pair in zip(map(repr, weights), prefixes, strict=True) for value in pair]
