"""Every part of benchmarks/train_throughput.py builds a config Megatron-Core accepts on GPU.

All three FP8 parts first died at config build on the H200 (router padding for FP8 with the
default allgather dispatcher): this runs the same check on CPU, before a GPU is spent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from joyai_megatron.compat.target import assume_transformer_engine
from joyai_megatron.config.recipe import load_recipe
from joyai_megatron.model.config import ConfigRejected, build_transformer_config, check_gpu_config
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


FUSIONS = [
    "model.bias_activation_fusion=true",
    "model.moe_router_fusion=true",
    "model.cross_entropy_fusion_impl=te",
    "model.moe_shared_expert_overlap=true",
]


@pytest.mark.parametrize("part", ["te-no-mtp", "te-fp8-blockwise"])
def test_fusion_overrides_build_their_gpu_config(part: str, tmp_path: Path) -> None:
    """The kernel fusions a GPU session measures with ``--set`` reach Megatron-Core's config and
    pass its checks for the te parts (BF16 and the recipes' FP8)."""
    argv = ["--out-dir", str(tmp_path), *(f"--set={override}" for override in FUSIONS)]
    args = bench.parse_args(argv)
    for key, value in bench.PARTS[part][1].items():
        setattr(args, key, value)
    recipe = load_recipe(bench.bench_recipe(args, tmp_path, train_iters=4), args.set)
    arch = recipe_arch(recipe)
    check_gpu_config(arch, recipe.model, recipe.parallel, recipe.precision)
    with assume_transformer_engine():
        config = build_transformer_config(
            arch, recipe.model, recipe.parallel, recipe.precision, use_cpu_initialization=True, on_gpu=True
        )
    assert (config.bias_activation_fusion, config.moe_router_fusion) == (True, True)
    assert config.moe_shared_expert_overlap
    assert config.cross_entropy_fusion_impl == "te" and config.cross_entropy_loss_fusion


@pytest.mark.parametrize("override", FUSIONS[1:3])
def test_transformer_engine_fusions_are_refused_on_the_local_backend(override: str, tmp_path: Path) -> None:
    args = bench.parse_args(["--out-dir", str(tmp_path), f"--set={override}"])
    recipe = load_recipe(bench.bench_recipe(args, tmp_path, train_iters=4), args.set)
    key = override.split("=")[0]
    with pytest.raises(
        ValueError, match=f"^{key} is a Transformer Engine kernel: it needs model.backend=te"
    ) as err:
        check_gpu_config(recipe_arch(recipe), recipe.model, recipe.parallel, recipe.precision)
    assert not isinstance(err.value, ConfigRejected)  # ours, not blamed on Megatron-Core


def test_shared_expert_overlap_with_allgather_names_the_key(tmp_path: Path) -> None:
    """Megatron-Core overlaps the shared expert with the alltoall/flex dispatchers only (the local
    parts use allgather): refused before a GPU is spent, naming the recipe key."""
    args = bench.parse_args(["--out-dir", str(tmp_path), "--set=model.moe_shared_expert_overlap=true"])
    recipe = load_recipe(bench.bench_recipe(args, tmp_path, train_iters=4), args.set)
    with pytest.raises(ConfigRejected) as err:
        check_gpu_config(recipe_arch(recipe), recipe.model, recipe.parallel, recipe.precision)
    assert err.value.keys == ["model.moe_shared_expert_overlap"] and "alltoall" in err.value.reason
