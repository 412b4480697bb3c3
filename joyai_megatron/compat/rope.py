"""Rotary embedding of packed (THD) sequences without host syncs, for runs without TE's fused RoPE.

Megatron-Core 0.19.2's unfused ``rope_utils._apply_rotary_pos_emb_thd`` (l.222-239) reads the
segment lengths to the host (``.tolist()``, ``.item()``) and loops over segments in Python: two
device-to-host syncs per call, two calls (query and key) per MLA layer per micro-batch, each one
draining the GPU queue.  With one context-parallel rank the same result is a gather: token ``j`` of
a segment starting at ``s`` takes ``freqs[j - s]`` (or ``freqs[j]`` when ``freqs`` covers the whole
packed batch, upstream's "exact mapping" case), and one rotation over all tokens.  Context
parallelism (CP > 1) keeps the upstream function.  TE's fused kernel (``apply_rope_fusion``, the
``te`` backend on GPU) never reaches either.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings import rope_utils

_UPSTREAM = rope_utils._apply_rotary_pos_emb_thd


def apply_rotary_pos_emb_thd(
    t: torch.Tensor,
    cu_seqlens: torch.Tensor,
    freqs: torch.Tensor,
    rotary_interleaved: bool = False,
    mla_rotary_interleaved: bool = False,
    mscale: float = 1.0,
    cp_group: torch.distributed.ProcessGroup | None = None,
    multi_latent_attention: bool | None = None,
) -> torch.Tensor:
    """Upstream's signature and result; ``t`` is [tokens, heads, dim], ``freqs`` [max_s, 1, 1, dim]."""
    if cp_group is None or cp_group.size() != 1 or multi_latent_attention is not None:
        return _UPSTREAM(
            t,
            cu_seqlens,
            freqs,
            rotary_interleaved=rotary_interleaved,
            mla_rotary_interleaved=mla_rotary_interleaved,
            mscale=mscale,
            cp_group=cp_group,
            multi_latent_attention=multi_latent_attention,
        )
    tokens = torch.arange(t.shape[0], device=t.device)
    if freqs.shape[0] == t.shape[0]:
        positions = tokens  # freqs span the packed batch: absolute positions (upstream's case 1)
    else:
        starts = cu_seqlens.to(device=t.device, dtype=torch.long)
        segment = torch.searchsorted(starts, tokens, right=True) - 1
        positions = tokens - starts[segment]
    return rope_utils._apply_rotary_pos_emb_bshd(
        t.unsqueeze(1),
        freqs[positions],
        rotary_interleaved=rotary_interleaved,
        mla_rotary_interleaved=mla_rotary_interleaved,
        mscale=mscale,
    ).squeeze(1)


def use_sync_free_thd_rope() -> bool:
    """Route Megatron's unfused THD RoPE through :func:`apply_rotary_pos_emb_thd` (idempotent);
    ``apply_rotary_pos_emb`` looks the function up in its module at call time."""
    if rope_utils._apply_rotary_pos_emb_thd is apply_rotary_pos_emb_thd:
        return False
    rope_utils._apply_rotary_pos_emb_thd = apply_rotary_pos_emb_thd
    return True
