"""Layer specs for the two backends, and JoyAI's dense MTP block.

``te``: Transformer Engine linears and fused attention, grouped-GEMM experts, FP8-ready (the
production path).  ``local``: pure PyTorch (Megatron-Core's own linears, sequential experts, our
SDPA core attention), which runs on CPU and on GPUs without TE.  Neither path imports Transformer
Engine unless ``te`` is asked for.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
from typing import Any

from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_decoder_layer_specs,
    get_gpt_mtp_block_spec,
)
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from joyai_megatron.compat.mla import replicated_down_projection
from joyai_megatron.model.attention import SDPACoreAttention
from joyai_megatron.model.experts import GroupedMMExperts
from joyai_megatron.model.norm import LocalRMSNorm


def require_transformer_engine() -> None:
    if importlib.util.find_spec("transformer_engine") is None:
        raise RuntimeError(
            "model.backend=te needs Transformer Engine, which is not installed here. Run inside the "
            "NGC PyTorch container (see docs/install.md), install requirements-gpu.txt on a GPU "
            "machine, or use model.backend=local (CPU and debugging)."
        )


def _swap_norms(node: Any, seen: set[int] | None = None) -> Any:
    """Replace Megatron's torch-norm fallback by ``LocalRMSNorm`` everywhere in a spec tree."""
    seen = set() if seen is None else seen
    if id(node) in seen:
        return node
    seen.add(id(node))
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if value is WrappedTorchNorm:
                setattr(node, f.name, LocalRMSNorm)
            elif isinstance(value, list):
                setattr(
                    node,
                    f.name,
                    [LocalRMSNorm if v is WrappedTorchNorm else _swap_norms(v, seen) for v in value],
                )
            else:
                _swap_norms(value, seen)
    elif isinstance(node, ModuleSpec):
        _swap_norms(node.submodules, seen)
    elif isinstance(node, functools.partial):
        for value in node.keywords.values():
            _swap_norms(value, seen)
    return node


def _group_experts(layer: ModuleSpec) -> None:
    """Swap SequentialMLP for GroupedMMExperts (same parameters) in an MoE layer's spec."""
    submodules = _mlp_submodules(layer)
    experts = getattr(submodules, "experts", None)
    if isinstance(experts, functools.partial) and experts.func is SequentialMLP:
        submodules.experts = functools.partial(GroupedMMExperts, *experts.args, **experts.keywords)


def _torch_grouped_experts(spec: TransformerBlockSubmodules) -> TransformerBlockSubmodules:
    """The ``te`` block with PyTorch grouped-GEMM experts (``model.moe_grouped_gemm_impl=torch``):
    Transformer Engine everywhere else, the routed experts as on the local backend.  TE's grouped
    GEMM takes the token counts as host integers, so the dispatcher waits on the GPU once per MoE
    layer per micro-batch; ``GroupedMMExperts`` takes them as device offsets.  Checkpoints are the
    same: Megatron-Core saves ``SequentialMLP`` and ``TEGroupedMLP`` experts under one format."""
    spec = copy.deepcopy(spec)
    for layer in spec.layer_specs:
        submodules = _mlp_submodules(layer)
        if hasattr(submodules, "experts"):
            submodules.experts = LocalSpecProvider().grouped_mlp_modules(True)  # SequentialMLP, local linears
            _group_experts(layer)
    return spec


# Transformer Engine fuses three of a layer's RMSNorms into the linear that follows them and saves
# them under that linear's ``layer_norm_weight``; the local backend keeps separate norm modules.
# Saving local checkpoints under TE's names (Megatron-Core does the same for its non-MLA local spec,
# gpt_layer_specs.py ``sharded_state_dict_keys_map``, but not for MLA) makes one on-disk format:
# a checkpoint written on either backend loads on the other.
TE_NORM_NAMES = {
    "self_attention.q_layernorm.": "self_attention.linear_q_up_proj.layer_norm_",
    "self_attention.kv_layernorm.": "self_attention.linear_kv_up_proj.layer_norm_",
}
TE_DENSE_NORM_NAMES = {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}  # MoE layers keep theirs


def _mlp_submodules(layer: ModuleSpec) -> Any:
    mlp = layer.submodules.mlp
    if isinstance(mlp, functools.partial):
        return mlp.keywords.get("submodules")
    return getattr(mlp, "submodules", None)


def _te_checkpoint_names(layer: ModuleSpec) -> None:
    names = dict(TE_NORM_NAMES)
    if not hasattr(_mlp_submodules(layer), "experts"):  # a dense FFN (MoE layers have experts)
        names.update(TE_DENSE_NORM_NAMES)
    layer.submodules.sharded_state_dict_keys_map = {**layer.submodules.sharded_state_dict_keys_map, **names}


def _localize(spec: Any, grouped_experts: bool = False) -> Any:
    """The ``local`` backend: SDPA core attention, replicated MLA down projections,
    sequence-parallel-capable RMSNorm, TE's checkpoint names and, with ``moe_grouped_gemm``,
    grouped-GEMM experts."""
    spec = copy.deepcopy(spec)
    _swap_norms(spec)
    layers = spec.layer_specs if isinstance(spec, TransformerBlockSubmodules) else [spec]
    for layer in layers:
        _te_checkpoint_names(layer)
        attention = layer.submodules.self_attention.submodules
        attention.core_attention = SDPACoreAttention
        # Replicated down projections, as with TE: exact k_pos_emb gradients under TP (compat/mla.py).
        attention.linear_q_down_proj = attention.linear_kv_down_proj = replicated_down_projection()
        if grouped_experts:
            _group_experts(layer)
    return spec


def decoder_block_spec(
    config: TransformerConfig,
    backend: str,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
    *,
    grouped_gemm_impl: str = "auto",
) -> TransformerBlockSubmodules:
    """Per-layer specs for the layers this pipeline rank builds (dense layer 0, then MoE)."""
    use_te = backend == "te"
    if use_te:
        require_transformer_engine()
    block = get_gpt_decoder_block_spec(
        config, use_transformer_engine=use_te, normalization="RMSNorm", vp_stage=vp_stage, pp_rank=pp_rank
    )
    if not use_te:
        return _localize(block, grouped_experts=config.moe_grouped_gemm)
    return _torch_grouped_experts(block) if grouped_gemm_impl == "torch" else block


def dense_layer_spec(config: TransformerConfig, backend: str) -> ModuleSpec:
    """The spec of a dense (non-MoE) transformer layer: JoyAI's MTP block uses it."""
    use_te = backend == "te"
    dense_config = copy.copy(config)
    dense_config.moe_layer_freq = [0] * config.num_layers
    spec = get_gpt_decoder_layer_specs(dense_config, use_transformer_engine=use_te, normalization="RMSNorm")[
        0
    ]
    return spec if use_te else _localize(spec)


def mtp_block_spec(
    config: TransformerConfig, backend: str, vp_stage: int | None = None, pp_rank: int | None = None
):
    """JoyAI's dense MTP: eh_proj + one transformer layer whose FFN is the dense SwiGLU.

    Megatron-Core's default MTP reuses the decoder's last layer spec (an MoE layer for
    DeepSeek-V3); passing the dense layer spec instead gives JoyAI's 7168-wide dense FFN.
    """
    if not config.mtp_num_layers:
        return None
    spec = get_gpt_mtp_block_spec(
        config,
        dense_layer_spec(config, backend),
        use_transformer_engine=backend == "te",
        vp_stage=vp_stage,
        pp_rank=pp_rank,
    )
    return spec if backend == "te" or spec is None else _swap_norms(spec)
