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
    bench.apply_part(args, part)
    recipe = load_recipe(bench.bench_recipe(args, tmp_path, train_iters=4), args.set)
    check_gpu_config(recipe_arch(recipe), recipe.model, recipe.parallel, recipe.precision)
    assert (recipe.precision.fp8 is not None) == ("fp8" in part)
    if part.startswith("te-torch-experts"):
        assert recipe.model.moe_grouped_gemm_impl == "torch" and recipe.model.bias_activation_fusion
        assert (
            recipe.model.moe_token_dispatcher == "allgather" and not recipe.model.moe_router_padding_for_fp8
        )
        fused = (recipe.model.moe_router_fusion, recipe.model.cross_entropy_fusion_impl == "te")
        assert fused == (("fused" in part),) * 2
    assert recipe.model.mtp_enabled == (not part.endswith("no-mtp"))


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
    bench.apply_part(args, part)
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


def test_command_line_overrides_win_over_a_parts_own(tmp_path: Path) -> None:
    args = bench.parse_args(["--out-dir", str(tmp_path), "--set=model.bias_activation_fusion=false"])
    bench.apply_part(args, "te-torch-experts-no-mtp")
    recipe = load_recipe(bench.bench_recipe(args, tmp_path, train_iters=4), args.set)
    assert recipe.model.moe_grouped_gemm_impl == "torch" and not recipe.model.bias_activation_fusion


def _te_recipe(tmp_path: Path, *overrides: str):
    args = bench.parse_args(["--out-dir", str(tmp_path), *(f"--set={o}" for o in overrides)])
    bench.apply_part(args, "te-no-mtp")
    return load_recipe(bench.bench_recipe(args, tmp_path, train_iters=4), args.set)


@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_torch_grouped_experts_build_their_gpu_config(impl: str, tmp_path: Path) -> None:
    """``moe_grouped_gemm_impl=torch`` on te: Megatron-Core accepts it with the allgather dispatcher,
    and TE's fused permutation is off so the sync-free dispatch (compat/dispatch.py) applies."""
    recipe = _te_recipe(
        tmp_path, f"model.moe_grouped_gemm_impl={impl}", "model.moe_token_dispatcher=allgather"
    )
    arch = recipe_arch(recipe)
    check_gpu_config(arch, recipe.model, recipe.parallel, recipe.precision)
    with assume_transformer_engine():
        config = build_transformer_config(
            arch, recipe.model, recipe.parallel, recipe.precision, use_cpu_initialization=True, on_gpu=True
        )
    assert config.moe_permute_fusion == (impl == "auto")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.moe_grouped_gemm_impl=cutlass"], "model.moe_grouped_gemm_impl must be one of"),
        (
            ["model.moe_grouped_gemm_impl=torch", "model.moe_grouped_gemm=false"],
            "model.moe_grouped_gemm_impl=torch needs model.moe_grouped_gemm=true",
        ),
    ],
)
def test_bad_grouped_gemm_impl_names_the_key(overrides: list[str], message: str, tmp_path: Path) -> None:
    recipe = _te_recipe(tmp_path, *overrides)
    with pytest.raises(ValueError, match=f"^{message}"):
        check_gpu_config(recipe_arch(recipe), recipe.model, recipe.parallel, recipe.precision)


def test_torch_grouped_experts_replace_only_the_routed_experts() -> None:
    """The spec swap puts ``GroupedMMExperts`` on Megatron-Core's local linears in each MoE layer
    and leaves the dense layer, the shared experts and the caller's spec alone (run here on the
    local block spec: the te one needs Transformer Engine to build)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from joyai_megatron.config.schema import ModelCfg, ParallelCfg, PrecisionCfg
    from joyai_megatron.model.experts import GroupedMMExperts
    from joyai_megatron.model.presets import get_preset
    from joyai_megatron.model.spec import _mlp_submodules, _torch_grouped_experts

    arch = get_preset("tiny")
    config = build_transformer_config(arch, ModelCfg(moe_grouped_gemm=True), ParallelCfg(), PrecisionCfg())
    block = get_gpt_decoder_block_spec(
        config, use_transformer_engine=False, normalization="RMSNorm", pp_rank=0
    )
    swapped = _torch_grouped_experts(block)
    kinds = []
    for before, after in zip(block.layer_specs, swapped.layer_specs, strict=True):
        old, new = _mlp_submodules(before), _mlp_submodules(after)
        if not hasattr(old, "experts"):
            assert type(new) is type(old)  # dense layer 0
            kinds.append("dense")
            continue
        assert old.experts.func is not GroupedMMExperts  # the input spec is not modified
        assert new.experts.func is GroupedMMExperts
        linears = new.experts.keywords["submodules"]
        assert (linears.linear_fc1, linears.linear_fc2) == (ColumnParallelLinear, RowParallelLinear)
        assert new.shared_experts is not None and new.router == old.router
        kinds.append("moe")
    assert kinds == ["dense"] + ["moe"] * (arch.num_layers - 1)


def test_default_parts_are_the_fastest_where_they_run(monkeypatch: pytest.MonkeyPatch) -> None:
    assert bench.default_parts() == "ours,baseline"  # no GPU or no Transformer Engine here
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: object())
    parts = bench.default_parts().split(",")
    assert parts == ["te-torch-experts-fused-no-mtp", "te-torch-experts", "baseline"]
    assert all(p in bench.PARTS for p in parts)
