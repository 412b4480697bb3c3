"""Greedy (or sampled) decoding with the Megatron GPTModel, for evaluation on one process.

No KV cache: every step re-runs the model on the grown sequences.  That is quadratic, but the
answers scored here are a few dozen tokens, and it reuses the training forward exactly (the same
THD packing with per-sequence attention, so many prompts decode in one call).  Only the last
position of each sequence goes through the output layer.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class PackedSequences:
    """Sequences packed into one THD row: ``tokens``/``positions`` ``[1, T]``, ``starts`` per sequence."""

    tokens: torch.Tensor
    positions: torch.Tensor
    params: PackedSeqParams
    starts: list[int]


def pack_sequences(sequences: Sequence[Sequence[int]], device: torch.device) -> PackedSequences:
    """One THD row holding every sequence, attention and positions restarting per sequence."""
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
    return PackedSequences(tokens.to(device), positions.to(device), params, cu[:-1].tolist())


def next_token_logits(model: torch.nn.Module, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    """Logits for the token after each sequence, ``[len(sequences), vocab]``, in one packed call."""
    device = next(model.parameters()).device
    packed = pack_sequences(sequences, device)
    last = torch.tensor(
        [s + len(seq) - 1 for s, seq in zip(packed.starts, sequences, strict=True)], device=device
    )
    with mtp_skipped(model):
        return model(
            packed.tokens,
            packed.positions,
            None,
            packed_seq_params=packed.params,
            output_processor=_last_token_logits,
            output_processor_context=last,
        )


def pack_groups(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
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
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Continuation of every prompt, up to and including the first stop token.

    Greedy by default; ``temperature > 0`` samples from the softmax at that temperature instead
    (pass@k evaluation), drawing from ``generator``.
    """
    was_training = model.training
    model.eval()
    outputs: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    try:
        for _ in range(max_new_tokens):
            if not active:
                break
            sequences = [list(prompts[i]) + outputs[i] for i in active]
            for group in pack_groups([len(s) for s in sequences], max_pack_tokens):
                logits = next_token_logits(model, [sequences[k] for k in group])
                if temperature > 0:
                    probs = torch.softmax(logits.cpu() / temperature, dim=-1)
                    picks = torch.multinomial(probs, 1, generator=generator)[:, 0].tolist()
                else:
                    picks = logits.argmax(-1).tolist()
                for k, token in zip(group, picks, strict=True):
                    outputs[active[k]].append(int(token))
            active = [i for i in active if outputs[i][-1] not in stop_ids]
    finally:
        model.train(was_training)
    return outputs
