"""The GPU job's Megatron-Core config, checked on CPU: every shipped recipe builds it, an invalid one
is refused by ``plan`` (exit 2, Megatron-Core's reason, the recipe key), FP8 is refused for shapes
cuBLAS cannot run, and local checkpoints use Transformer Engine's names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from joyai_megatron.compat import target
from joyai_megatron.config.recipe import load_recipe
from joyai_megatron.config.schema import PrecisionCfg
from joyai_megatron.model.config import ConfigRejected, check_fp8_shapes, check_gpu_config, recipe_keys_in
from joyai_megatron.model.presets import TINY, get_preset, recipe_arch
from tests.joyai_helpers import REPO, run_cli

SHIPPED = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if p.name != "base.yaml")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_shipped_recipe_builds_its_gpu_config(path: Path) -> None:
    recipe = load_recipe(path)
    arch = recipe_arch(recipe)
    check_gpu_config(arch, recipe.model, recipe.parallel, recipe.precision)


def test_plan_refuses_what_megatron_core_rejects() -> None:
    result = run_cli(
        "plan", "recipes/rl/joyai_48b_a3b_fiberpo.yaml", "precision.fp8_param_gather=true", "precision.fp8=null",
        "--nodes", "16", "--gpus-per-node", "8",
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "fp8_param must be used together with fp8 mode" in result.stderr  # upstream's own words
    assert "precision.fp8_param_gather" in result.stderr and "precision.fp8" in result.stderr


def test_a_valid_recipe_still_plans() -> None:
    result = run_cli("plan", "recipes/dpo/joyai_48b_a3b.yaml", "--nodes", "16", "--gpus-per-node", "8")
    assert result.returncode == 0, result.stderr[-2000:]


def test_rejection_names_the_recipe_keys() -> None:
    message = "fp8/fp4 must be specified when moe_router_padding_for_quantization is True."
    assert recipe_keys_in(message) == ["model.moe_router_padding_for_fp8", "precision.fp8"]
    assert str(ConfigRejected(message, recipe_keys_in(message))).endswith(
        "(recipe keys: model.moe_router_padding_for_fp8, precision.fp8)"
    )


def test_fp8_refused_for_dims_cublas_cannot_run() -> None:
    fp8 = PrecisionCfg(dtype="bf16", fp8="e4m3", fp8_recipe="blockwise")
    with pytest.raises(ValueError, match=r"'tiny'.*linear_kv_down_proj 64x40"):
        check_fp8_shapes(TINY, fp8, "tiny")  # kv_lora_rank 32 + rope 8 = 40, not a multiple of 16
    check_fp8_shapes(get_preset("joyai_48b_a3b"), fp8, "joyai_48b_a3b")  # every JoyAI dim is
    check_fp8_shapes(TINY, PrecisionCfg(), "tiny")  # no FP8, no constraint


def test_te_version_assumed_is_the_pinned_one() -> None:
    pin = re.search(r"transformer-engine\[[^\]]*\]==([\w.]+)", (REPO / "requirements-gpu.txt").read_text())
    assert pin is not None and pin.group(1) == target.TE_VERSION


def test_assumed_transformer_engine_is_restored() -> None:
    from megatron.core import utils as mcore_utils
    from megatron.core.transformer.moe import moe_utils

    before = (mcore_utils._te_version, moe_utils.fused_permute)
    with target.assume_transformer_engine():
        if before[1] is None:  # no TE here: the check sees the pinned version and the kernels
            assert str(mcore_utils.get_te_version()) == target.TE_VERSION
            assert moe_utils.fused_permute is not None
    assert (mcore_utils._te_version, moe_utils.fused_permute) == before


def test_local_checkpoints_use_transformer_engine_names(single_process: None) -> None:
    """TE fuses q/kv layernorms (and a dense layer's pre-MLP norm) into the next linear; the local
    backend saves them under those names so a local checkpoint loads on `te` (seen failing on an
    H200 before: ``linear_q_up_proj.layer_norm_weight from model not in state dict``)."""
    from joyai_megatron.config.schema import ModelCfg, ParallelCfg
    from joyai_megatron.model.build import build_joyai_model
    from joyai_megatron.model.config import build_transformer_config
    from joyai_megatron.training.distributed import init_distributed, init_model_parallel
    from joyai_megatron.training.layout import Layout

    init_distributed()
    init_model_parallel(Layout(1, 1, 1, 1, 1, 1, 1, 1, None))
    config = build_transformer_config(TINY, ModelCfg(), ParallelCfg(), PrecisionCfg())
    model = build_joyai_model(
        config, TINY, "local", pre_process=True, post_process=True, max_sequence_length=64
    )
    keys = {v.key for k, v in model.sharded_state_dict().items() if "norm" in k and "_extra" not in k}
    assert "decoder.layers.0.self_attention.linear_q_up_proj.layer_norm_weight" in keys
    assert "decoder.layers.1.self_attention.linear_kv_up_proj.layer_norm_weight" in keys
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in keys  # dense layer 0
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in keys  # MoE layers keep their own norm
    assert "mtp.layers.0.transformer_layer.mlp.linear_fc1.layer_norm_weight" in keys  # dense MTP
    assert not any(k.endswith(("q_layernorm.weight", "kv_layernorm.weight")) for k in keys)


GPU_RECIPES = [p for p in SHIPPED if "joyai_48b_a3b" in str(p)]


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_smoke_puts_each_gpu_recipe_on_one_device(path: Path, tmp_path: Path) -> None:
    """What `smoke` runs is the shipped recipe with only depth, layout, batch, length and data cut."""
    import argparse

    from joyai_megatron.smoke import smoke_recipe
    from joyai_megatron.training.layout import validate_layout

    args = argparse.Namespace(
        overrides=[], layers=2, vocab_size=8192, max_seq_length=32768, global_batch=4, steps=3
    )
    shipped = load_recipe(path)
    recipe = smoke_recipe(str(path), tmp_path, tmp_path / "data", args, init=tmp_path / "init")
    arch = recipe_arch(recipe)
    layout = validate_layout(recipe, arch, world_size=1)
    assert (layout.tp, layout.pp, layout.ep, layout.cp, layout.dp) == (1, 1, 1, 1, 1)
    assert arch.num_layers == 2 and arch.num_experts == 256 // shipped.parallel.ep
    assert arch.hidden_size == 2048 and arch.moe_ffn_hidden_size == 768  # the real widths
    # As shipped: backend, precision, recompute, optimizer, checkpointing.
    assert recipe.model.backend == shipped.model.backend == "te"
    assert recipe.precision == shipped.precision
    assert (recipe.model.recompute, recipe.model.recompute_modules) == (
        shipped.model.recompute,
        shipped.model.recompute_modules,
    )
    assert recipe.optim == shipped.optim and recipe.parallel.distributed_optimizer
    assert recipe.checkpoint.async_save == shipped.checkpoint.async_save
    check_gpu_config(arch, recipe.model, recipe.parallel, recipe.precision)
    if recipe.stage == "rl":  # agentic recipes roll out on the tool-use prompts
        prompts = tmp_path / "data" / ("agentic/rl" if shipped.rl.agentic.enabled else "rl")
        assert recipe.data.rl_path == str(prompts / "train.jsonl")
