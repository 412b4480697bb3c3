"""The recipe's ``qat`` section -> a ModelOpt quantization config, and the checks that run first.

Formats (ModelOpt presets, calibrated with ``max``):

* ``int4_w4a16`` (JoyAI's): INT4 weights, one scale per ``block_size`` input channels of each
  output row, activations in high precision (``INT4_BLOCKWISE_WEIGHT_ONLY_CFG``).
* ``w4afp8``: the same INT4 weights, re-quantized per tensor to FP8, with static per-tensor FP8
  activations (``W4A8_AWQ_BETA_CFG`` without the AWQ search: QAT learns the weights instead).
* ``fp8``: per-tensor FP8 (E4M3) weights and static per-tensor FP8 activations (``FP8_DEFAULT_CFG``).

ModelOpt's defaults keep the LM head, the routers, the embeddings and the MTP block (``mtp.*``) in
high precision; ``qat.quantize_mtp`` and ``qat.exclude`` adjust that.  All three formats fake-quantize
in plain PyTorch, so they run on CPU as well as on GPUs.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from joyai_megatron.config.schema import Recipe
from joyai_megatron.errors import UserError
from joyai_megatron.model.presets import ModelArch

PRESETS = {
    "int4_w4a16": "INT4_BLOCKWISE_WEIGHT_ONLY_CFG",
    "w4afp8": "W4A8_AWQ_BETA_CFG",
    "fp8": "FP8_DEFAULT_CFG",
}
INT4_FORMATS = ("int4_w4a16", "w4afp8")
# Formats whose activation scales come from the calibration data (the others only need weights).
ACTIVATION_FORMATS = ("w4afp8", "fp8")


class QATConfigError(UserError, ValueError):
    """A QAT recipe that cannot run; the message names the key."""


def modelopt_config(recipe: Recipe) -> dict[str, Any]:
    """The ModelOpt ``quantize`` config for ``recipe.qat`` (a fresh copy; ModelOpt may mutate it)."""
    import modelopt.torch.quantization as mtq

    q = recipe.qat
    config = copy.deepcopy(getattr(mtq, PRESETS[q.format]))
    for entry in config["quant_cfg"]:
        cfgs = entry.get("cfg")
        for cfg in cfgs if isinstance(cfgs, list) else [cfgs]:
            if isinstance(cfg, dict) and cfg.get("block_sizes"):
                cfg["block_sizes"] = {**cfg["block_sizes"], -1: q.block_size}
    if q.quantize_mtp:
        config["quant_cfg"] = [e for e in config["quant_cfg"] if e.get("quantizer_name") != "mtp.*"]
    config["quant_cfg"] += [{"quantizer_name": pattern, "enable": False} for pattern in q.exclude]
    config["algorithm"] = "max"
    return config


def quantized_input_dims(recipe: Recipe, arch: ModelArch) -> dict[str, int]:
    """Per-rank input width of every kind of linear layer the recipe quantizes.

    Row-parallel layers (attention output, FFN down projections) see their input split by tensor
    parallelism (expert tensor parallelism for routed experts); a block must not straddle shards.
    """
    p = recipe.parallel
    h = arch.hidden_size
    dims = {
        "linear_q_down_proj/linear_kv_down_proj (hidden_size)": h,
        "linear_kv_up_proj (kv_lora_rank)": arch.kv_lora_rank,
        f"linear_proj (num_attention_heads*v_head_dim/tp={p.tp})": arch.num_attention_heads
        * arch.v_head_dim
        // p.tp,
    }
    if arch.q_lora_rank is None:
        dims["linear_q_proj (hidden_size)"] = h
    else:
        dims["linear_q_up_proj (q_lora_rank)"] = arch.q_lora_rank
    if arch.first_k_dense or recipe.qat.quantize_mtp:
        dims["mlp.linear_fc1 (hidden_size)"] = h
        dims[f"mlp.linear_fc2 (ffn_hidden_size/tp={p.tp})"] = arch.ffn_hidden_size // p.tp
    if arch.num_experts and arch.first_k_dense < arch.num_layers:
        dims["experts.linear_fc1 (hidden_size)"] = h
        dims[f"experts.linear_fc2 (moe_ffn_hidden_size/etp={p.etp})"] = arch.moe_ffn_hidden_size // p.etp
        if arch.num_shared_experts:
            dims[f"shared_experts.linear_fc2 (shared expert width/tp={p.tp})"] = (
                arch.shared_expert_hidden_size // p.tp
            )
    if recipe.qat.quantize_mtp and arch.mtp_num_layers and recipe.model.mtp_enabled:
        dims["mtp eh_proj (2*hidden_size)"] = 2 * h
    return dims


def check_qat_recipe(recipe: Recipe, arch: ModelArch) -> None:
    """Every QAT-specific reason a run would fail later, raised before any expensive work."""
    q, m, p = recipe.qat, recipe.model, recipe.parallel
    if q.format not in PRESETS:
        raise QATConfigError(f"qat.format={q.format!r} is not one of {sorted(PRESETS)}")
    if q.weight_amax not in ("dynamic", "static"):
        raise QATConfigError(f"qat.weight_amax={q.weight_amax!r}; expected 'dynamic' or 'static'")
    if q.data not in ("pretrain", "sft"):
        raise QATConfigError(f"qat.data={q.data!r}; expected 'pretrain' or 'sft'")
    if q.calib_batches < 1:
        raise QATConfigError(f"qat.calib_batches={q.calib_batches} must be >= 1")
    if m.moe_grouped_gemm:
        raise QATConfigError(
            "model.moe_grouped_gemm=true: grouped experts bypass the per-expert linear layers that "
            "ModelOpt fake-quantizes and exports; set model.moe_grouped_gemm=false (sequential experts)"
        )
    if recipe.precision.fp8:
        raise QATConfigError(
            f"precision.fp8={recipe.precision.fp8!r}: Transformer Engine FP8 training and ModelOpt "
            "fake quantization do not compose; QAT trains BF16/FP32 master weights (unset precision.fp8)"
        )
    if p.vpp:
        raise QATConfigError(
            "parallel.vpp is set: ModelOpt's sharded state (modelopt_state/) supports one model chunk "
            "per rank; use plain pipeline parallelism for QAT"
        )
    if recipe.qat.compare and not recipe.train.eval_interval:
        raise QATConfigError(
            "qat.compare=true evaluates on the validation split, which train.eval_interval=0 disables; "
            "set train.eval_interval (e.g. to train.train_iters) or qat.compare=false"
        )
    if q.format in INT4_FORMATS:
        check_block_size(recipe, arch)


def check_block_size(recipe: Recipe, arch: ModelArch) -> None:
    """INT4 blocks run along each weight row's input channels and must tile it exactly (ModelOpt's
    export refuses partial blocks); name every layer kind whose width the block size misses."""
    block = recipe.qat.block_size
    if block <= 0:
        raise QATConfigError(f"qat.block_size={block} must be positive")
    dims = quantized_input_dims(recipe, arch)
    bad = {name: dim for name, dim in dims.items() if dim % block}
    if bad:
        fit = math.gcd(*dims.values())
        largest = fit & -fit  # the largest power of two dividing every width
        listed = ", ".join(f"{name} = {dim}" for name, dim in bad.items())
        raise QATConfigError(
            f"qat.block_size={block} does not divide the input width of {listed}; every quantized "
            f"linear needs width % block_size == 0. The largest power-of-two block that fits this "
            f"model and layout is {largest} (JoyAI's full-size widths all take 128)"
        )
