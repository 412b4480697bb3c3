"""Host-sync-free MoE token dispatch when every expert is local (one GPU, or TP = EP = 1 per layer).

Megatron-Core 0.19.2's ``MoEAllGatherTokenDispatcher.dispatch_postprocess`` (token_dispatcher.py
l.317-330) copies the per-expert token counts to the host (``.cpu()``), reads their sum
(``.item()``) for the permutation's output size, and selects the routing probabilities with
``masked_select``: three device-to-host synchronisations per MoE layer per micro-batch.  Each one
drains the GPU queue, so the host's Python (Megatron launches many small kernels) is no longer
hidden behind device work.  When the dispatcher spans a single rank and routing is dropless top-k,
every token goes to exactly ``k`` experts, so the permuted length is ``tokens * k``, known on the
host: the same argsort permutation then needs no sync, and the probabilities come out of it in the
same order.  ``MoEAlltoAllTokenDispatcher.preprocess`` (l.550) makes the same dropless assumption.

The counts stay on the device: ``GroupedMMExperts`` uses them as grouped-GEMM offsets without a
sync; ``SequentialMLP`` still reads them to the host (it needs Python split sizes).  Outputs and
gradients are bitwise those of the upstream method.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import permute
from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher


class LocalAllGatherDispatcher(MoEAllGatherTokenDispatcher):
    """The all-gather dispatcher for a single-rank expert group, without host syncs."""

    def dispatch_postprocess(
        self, hidden_states: torch.Tensor, probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.hidden_shape_before_permute = hidden_states.shape
        # All experts are local: upstream's column slice is the whole map.
        self.local_map = self.routing_map
        tokens_per_expert = self.local_map.sum(dim=0).long()
        permuted, permuted_probs, self.reversed_local_input_permutation_mapping, _, _ = permute(
            hidden_states,
            self.local_map,
            probs=probs,
            num_out_tokens=self.local_map.shape[0] * self.router_topk,
            fused=False,
        )
        self.local_probs = permuted_probs
        self.routing_map = None
        return permuted, tokens_per_expert, self.local_probs


def sync_free_applies(dispatcher: object) -> bool:
    """Whether ``dispatcher`` may be swapped: the stock all-gather class on one rank, unfused
    permutation, and routing that gives every token exactly top-k experts."""
    if type(dispatcher) is not MoEAllGatherTokenDispatcher:
        return False
    c = dispatcher.config
    return (
        dispatcher.tp_size == 1
        and dispatcher.ep_size == 1
        and not c.moe_permute_fusion
        and c.moe_expert_capacity_factor is None
        and not c.moe_router_padding_for_quantization
        and c.moe_router_load_balancing_type != "quantile_balancing"
    )


def use_sync_free_dispatch(model: torch.nn.Module) -> int:
    """Switch every eligible MoE layer of ``model`` to :class:`LocalAllGatherDispatcher` (same
    state, subclass methods); returns how many were switched."""
    switched = 0
    for module in model.modules():
        dispatcher = getattr(module, "token_dispatcher", None)
        if dispatcher is not None and sync_free_applies(dispatcher):
            dispatcher.__class__ = LocalAllGatherDispatcher
            switched += 1
    return switched
