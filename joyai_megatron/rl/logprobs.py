"""Per-token log-probs and entropy from the trainer's (vocab-parallel) logits.

With tensor parallelism GPTModel's output layer leaves the logits split over the vocabulary;
``vocab_parallel_cross_entropy`` computes -log p(target) across the shards with two all-reduces
(and is the identity path at TP = 1), so the full [tokens, vocab] softmax is never materialised.
The entropy, a detached metric, does the same reductions by hand.

Memory: at 16K tokens per micro-batch one fp32 [tokens, vocab] tensor of the 48B model is 8.5 GB.
The log-prob path makes exactly one (the cross entropy keeps it as its softmax for backward; the
temperature divides it in place), and the entropy works through ``ENTROPY_CHUNK`` tokens at a
time, so the loss adds no more than ``plan`` counts for a training step's logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

ENTROPY_CHUNK = 1024  # tokens per entropy slice: 0.5 GB per fp32 temporary at a 129K vocabulary


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(target) under softmax(logits / temperature); logits [..., V/tp], targets [...]."""
    scaled = logits.float()
    if scaled.data_ptr() == logits.data_ptr():
        scaled = scaled.clone()  # the cross entropy works in place; the caller's logits stay intact
    if temperature > 0 and temperature != 1.0:
        scaled.div_(temperature)
    return -vocab_parallel_cross_entropy(scaled, targets)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position, reduced over the TP vocab shards."""
    group = parallel_state.get_tensor_model_parallel_group()
    sharded = dist.get_world_size(group) > 1
    flat = logits.detach().reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, flat.shape[0], ENTROPY_CHUNK):  # every TP rank runs the same slices
        scaled = flat[start : start + ENTROPY_CHUNK].float() / (temperature if temperature > 0 else 1.0)
        top = scaled.max(dim=-1).values
        if sharded:
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        shifted = scaled - top.unsqueeze(-1)
        exp = shifted.exp()
        sums = torch.stack([exp.sum(-1), (exp * shifted).sum(-1)])
        if sharded:
            dist.all_reduce(sums, group=group)
        # H = log Z - E[x] with x the shifted logits and Z = sum exp(x)
        out[start : start + ENTROPY_CHUNK] = sums[0].log() - sums[1] / sums[0]
    return out.view(logits.shape[:-1])
