"""Padding tokens out of the aux-loss-free expert bias's load counts.

Megatron-Core 0.19.2's ``TopKRouter._apply_expert_bias`` (moe/router.py l.727-739) masks padding
with ``routing_map & (~padding_mask)``: ``routing_map`` is [tokens, experts] and the flattened
``padding_mask`` [tokens], which do not broadcast, so any forward that passes a padding mask to a
model with ``moe_router_enable_expert_bias`` (JoyAI's routing) fails.  The replacement below masks
per token (``padding_mask[:, None]``) and is otherwise the upstream method: counts accumulate only
with gradients enabled (not in evaluation, not twice under recompute).

Context parallelism pads every document to a multiple of 2*CP (``training/packing.py``); the stages
pass those padding positions as the padding mask, so the expert loads, and the bias updates
computed from them in ``finalize_model_grads``, are the same as without CP.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.router import TopKRouter


def _apply_expert_bias(
    self: TopKRouter, routing_map: torch.Tensor, padding_mask: torch.Tensor | None = None
) -> None:
    """Add this micro-batch's tokens per expert (padding excluded) to the router's load counter."""
    if self.enable_expert_bias and torch.is_grad_enabled():
        with torch.no_grad():
            if padding_mask is not None:
                routing_map = routing_map & ~padding_mask.reshape(-1, 1).bool()
            self.local_tokens_per_expert += routing_map.sum(dim=0)


def use_padding_aware_expert_bias() -> bool:
    """Install the per-token padding mask in ``TopKRouter`` (idempotent)."""
    if TopKRouter._apply_expert_bias is _apply_expert_bias:
        return False
    TopKRouter._apply_expert_bias = _apply_expert_bias
    return True
