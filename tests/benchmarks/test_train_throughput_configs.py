"""Every part of benchmarks/train_throughput.py builds a config Megatron-Core accepts on GPU.

All three FP8 parts first died at config build on the H200 (router padding for FP8 with the
default allgather dispatcher): this runs the same check on CPU, before a GPU is spent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from joyai_megatron.config.recipe import load_recipe
from joyai_megatron.model.config import check_gpu_config
from joyai_megatron.model.presets import recipe_arch
from tests.joyai_helpers import load_benchmark

bench = load_benchmark("train_throughput")

OURS = sorted(name for name, (runner, _) in bench.PARTS.items() if runner == "ours")


@pytest.mark.parametrize("part", OURS)
def test_part_builds_its_gpu_config(part: str, tmp_path: Path) -> None:
    args = bench.parse_args(["--out-dir", str(tmp_path)])
    for key, value in bench.PARTS[part][1].items():
        setattr(args, key, value)
    recipe = load_recipe(bench.bench_recipe(args, tmp_path, train_iters=4))
    check_gpu_config(recipe_arch(recipe), recipe.model, recipe.parallel, recipe.precision)
    assert (recipe.precision.fp8 is not None) == part.startswith("te-fp8")
