"""Every part of benchmarks/backend_equivalence.py builds a config Megatron-Core accepts on GPU.

The FP8 delayed-scaling part first died at config build on the H200 (delayed scaling refuses the
recipe's moe_act/layernorm recompute): this runs the same check on CPU, before a GPU is spent.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from joyai_megatron.config.recipe import load_recipe
from joyai_megatron.model.config import check_gpu_config
from joyai_megatron.model.presets import recipe_arch

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("backend_equivalence", REPO / "benchmarks" / "backend_equivalence.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("part", sorted(bench.PARTS))
def test_part_builds_its_gpu_config(part: str, tmp_path: Path) -> None:
    args = bench.parse_args(["--data", str(tmp_path), "--out-dir", str(tmp_path / "out"), "--layers", "2"])
    recipe = load_recipe(bench.BASE, [*bench.common_overrides(args), *bench.PARTS[part]])
    check_gpu_config(recipe_arch(recipe), recipe.model, recipe.parallel, recipe.precision)


def test_the_check_catches_the_recipe_recompute_with_delayed_scaling(tmp_path: Path) -> None:
    args = bench.parse_args(["--data", str(tmp_path), "--out-dir", str(tmp_path / "out"), "--layers", "2"])
    overrides = [o for o in bench.PARTS["te-fp8-delayed"] if not o.startswith("model.recompute_modules")]
    recipe = load_recipe(bench.BASE, [*bench.common_overrides(args), *overrides])
    with pytest.raises(ValueError, match="Delayed scaling does not support"):
        check_gpu_config(recipe_arch(recipe), recipe.model, recipe.parallel, recipe.precision)
