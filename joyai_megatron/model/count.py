"""Parameter and FLOP counts, measured on the real Megatron-Core model built on the meta device.

FLOPs per token (training = 3x forward: one forward, two for backward), with s the sequence
length and causal attention attending to (s+1)/2 keys on average:

* every matmul weight a token passes through costs 2 FLOPs per weight element forward: the dense
  layer's FFN, each MoE layer's *top-k* routed experts and shared expert, the router, MLA's
  down/up projections and output projection, the MTP block (eh_proj, its attention and dense FFN)
  and the output head, applied twice when MTP is on (main and MTP logits);
* attention scores and the weighted sum: 2 * heads * (qk_head_dim + qk_pos_emb_head_dim + v_head_dim)
  * (s+1)/2 per token per attention layer (decoder layers and the MTP layer).

Embedding lookups and norms are not counted (no matmul).  MFU = achieved FLOP/s / peak FLOP/s.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from joyai_megatron.config.schema import ModelCfg, ParallelCfg, PrecisionCfg
from joyai_megatron.model.presets import ModelArch

_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.|\.mlp\.experts\.linear_fc\d\.weight(\d+)")


@dataclass(frozen=True)
class ModelCounts:
    total_params: int  # main model (the spec's 48.94B), MTP excluded
    total_params_with_mtp: int
    active_params: int  # per token, with embedding and head, MTP excluded
    active_params_no_embedding: int
    mtp_params: int
    embedding_params: int
    output_params: int
    flops_per_token: float  # training FLOPs per token at seq_length (fwd + bwd)
    seq_length: int


def build_on_meta(arch: ModelArch, model: ModelCfg | None = None) -> torch.nn.Module:
    """The full model with no storage (seconds, even for 48B).

    Needs an initialised 1-rank process group (the caller starts it, e.g. with
    ``training.distributed.init_distributed``); Megatron's model-parallel state is set up if absent.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from joyai_megatron.compat.cpu import redirect_cuda_device
    from joyai_megatron.model.build import build_joyai_model
    from joyai_megatron.model.config import build_transformer_config

    if not dist.is_initialized():
        raise RuntimeError("build_on_meta needs an initialised process group (training.distributed.init_distributed)")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    model = model or ModelCfg(backend="local")
    model = dataclasses.replace(model, backend="local")  # shapes are backend-independent
    config = build_transformer_config(
        arch, model, ParallelCfg(), PrecisionCfg(), use_cpu_initialization=False
    )
    config.perform_initialization = False
    with redirect_cuda_device("meta"), torch.device("meta"):
        return build_joyai_model(config, arch, "local")


def attention_flops_per_token(arch: ModelArch, seq_length: int) -> float:
    head_dims = arch.qk_head_dim + arch.qk_pos_emb_head_dim + arch.v_head_dim
    return 2.0 * arch.num_attention_heads * head_dims * (seq_length + 1) / 2.0


def layer_matmul_params(arch: ModelArch) -> dict[str, int]:
    """Analytic per-token matmul weights by block (what ``count_model`` measures on the model)."""
    h, heads = arch.hidden_size, arch.num_attention_heads
    qk = arch.qk_head_dim + arch.qk_pos_emb_head_dim
    if arch.q_lora_rank:
        q = h * arch.q_lora_rank + arch.q_lora_rank * heads * qk
    else:
        q = h * heads * qk
    kv = h * (arch.kv_lora_rank + arch.qk_pos_emb_head_dim) + arch.kv_lora_rank * heads * (
        arch.qk_head_dim + arch.v_head_dim
    )
    attn = q + kv + heads * arch.v_head_dim * h
    dense_ffn = 3 * h * arch.ffn_hidden_size
    moe_active = (arch.moe_router_topk + arch.num_shared_experts) * 3 * h * arch.moe_ffn_hidden_size
    router = arch.num_experts * h
    return {
        "attention": attn,
        "dense_ffn": dense_ffn,
        "moe_ffn_active": moe_active + router,
        "eh_proj": 2 * h * h,
    }


def flops_per_token(arch: ModelArch, seq_length: int, mtp: bool = True) -> float:
    """Training FLOPs per token from the architecture alone (see the module docstring)."""
    blocks = layer_matmul_params(arch)
    n_dense = sum(1 for x in arch.moe_layer_freq if x == 0)
    n_moe = arch.num_layers - n_dense
    depth = arch.mtp_num_layers if mtp else 0
    matmul = (
        arch.num_layers * blocks["attention"]
        + n_dense * blocks["dense_ffn"]
        + n_moe * blocks["moe_ffn_active"]
        + depth * (blocks["attention"] + blocks["dense_ffn"] + blocks["eh_proj"])
        + (1 + depth) * arch.vocab_size * arch.hidden_size
    )
    attn_layers = arch.num_layers + depth
    return 3.0 * (2.0 * matmul + attn_layers * attention_flops_per_token(arch, seq_length))


def count_model(arch: ModelArch, seq_length: int = 4096, mtp: bool = True) -> ModelCounts:
    """Counts measured on the model built on the meta device (an initialised 1-rank group needed)."""
    model_cfg = ModelCfg(backend="local", mtp_enabled=mtp)
    model = build_on_meta(arch, model_cfg)
    total = active = mtp_params = emb = out = 0
    matmul_active = 0  # 2-D weights a token multiplies through (excludes the embedding lookup)
    topk_fraction = arch.moe_router_topk / arch.num_experts
    for name, p in model.named_parameters():
        n = p.numel()
        is_expert = _EXPERT.search(name) is not None
        share = topk_fraction if is_expert else 1.0
        if name.startswith("mtp."):
            mtp_params += n
        else:
            total += n
            active += n * share
        if name.startswith("embedding."):
            emb += n
        elif name.startswith("output_layer."):
            out += n
        elif p.ndim == 2:
            matmul_active += n * share
    # The output head runs once for the main logits and once more per MTP depth.
    depth = arch.mtp_num_layers if mtp else 0
    head_matmul = out * (1 + depth)
    attn_layers = arch.num_layers + depth
    forward = 2.0 * (matmul_active + head_matmul) + attn_layers * attention_flops_per_token(arch, seq_length)
    return ModelCounts(
        total_params=int(total),
        total_params_with_mtp=int(total + mtp_params),
        active_params=int(round(active)),
        active_params_no_embedding=int(round(active - emb - out)),
        mtp_params=int(mtp_params),
        embedding_params=int(emb),
        output_params=int(out),
        flops_per_token=3.0 * forward,
        seq_length=seq_length,
    )
