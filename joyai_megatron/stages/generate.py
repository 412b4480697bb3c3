"""Greedy decoding with the Megatron GPTModel, for evaluation on one process.

No KV cache: every step re-runs the model on the grown sequences.  That is quadratic, but the
answers scored here are a few dozen tokens, and it reuses the training forward exactly (the same
THD packing with per-sequence attention, so many prompts decode in one call).  Only the last
position of each sequence goes through the output layer.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from joyai_megatron.stages.logprobs import mtp_skipped


def _last_token_logits(
    *,
    hidden_states: torch.Tensor,
    output_layer: Any,
    output_weight: torch.Tensor | None,
    scale_logits: Any,
    context: torch.Tensor,
    **_: Any,
) -> torch.Tensor:
    """GPTModel ``output_processor``: full-vocabulary logits at the positions in ``context``."""
    picked = hidden_states.index_select(0, context)  # [n, 1, h]
    logits, _ = output_layer(picked, weight=output_weight, runtime_gather_output=True)
    return scale_logits(logits)[:, 0].float()  # [n, vocab]


def next_token_logits(model: torch.nn.Module, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    """Logits for the token after each sequence, ``[len(sequences), vocab]``, in one packed call."""
    device = next(model.parameters()).device
    lengths = torch.tensor([len(s) for s in sequences])
    cu = torch.zeros(len(sequences) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    tokens = torch.tensor([t for s in sequences for t in s], dtype=torch.long)[None]
    positions = torch.cat([torch.arange(n) for n in lengths.tolist()])[None]
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu.to(device),
        cu_seqlens_kv=cu.to(device),
        max_seqlen_q=int(lengths.max()),
        max_seqlen_kv=int(lengths.max()),
    )
    last = (cu[1:] - 1).long().to(device)
    with mtp_skipped(model):
        return model(
            tokens.to(device),
            positions.to(device),
            None,
            packed_seq_params=params,
            output_processor=_last_token_logits,
            output_processor_context=last,
        )


def _groups(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Consecutive indices packed into groups of at most ``max_tokens`` tokens (at least one each)."""
    groups: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        if groups[-1] and used + n > max_tokens:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return groups


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Collection[int],
    max_pack_tokens: int = 4096,
) -> list[list[int]]:
    """Greedy continuation of every prompt, up to and including the first stop token."""
    was_training = model.training
    model.eval()
    outputs: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    try:
        for _ in range(max_new_tokens):
            if not active:
                break
            sequences = [list(prompts[i]) + outputs[i] for i in active]
            for group in _groups([len(s) for s in sequences], max_pack_tokens):
                picks = next_token_logits(model, [sequences[k] for k in group]).argmax(-1).tolist()
                for k, token in zip(group, picks, strict=True):
                    outputs[active[k]].append(int(token))
            active = [i for i in active if outputs[i][-1] not in stop_ids]
    finally:
        model.train(was_training)
    return outputs
