"""Per-token log-probs and entropy from the trainer's (vocab-parallel) logits.

With tensor parallelism GPTModel's output layer leaves the logits split over the vocabulary;
``vocab_parallel_cross_entropy`` computes -log p(target) across the shards with two all-reduces
(and is the identity path at TP = 1), so the full [tokens, vocab] softmax is never materialised.
The entropy, a detached metric, does the same reductions by hand.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(target) under softmax(logits / temperature); logits [..., V/tp], targets [...]."""
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    return -vocab_parallel_cross_entropy(scaled, targets)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position, reduced over the TP vocab shards."""
    scaled = logits.detach().float() / (temperature if temperature > 0 else 1.0)
    group = parallel_state.get_tensor_model_parallel_group()
    sharded = dist.get_world_size(group) > 1
    top = scaled.max(dim=-1).values
    if sharded:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    shifted = scaled - top.unsqueeze(-1)
    exp = shifted.exp()
    sums = torch.stack([exp.sum(-1), (exp * shifted).sum(-1)])
    if sharded:
        dist.all_reduce(sums, group=group)
    # H = log Z - E[x] with x the shifted logits and Z = sum exp(x)
    return sums[0].log() - sums[1] / sums[0]
