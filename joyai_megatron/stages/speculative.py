"""Greedy self-speculative decoding with the dense MTP block as the drafter (DeepSeek-V3, JoyAI).

JoyAI reports an acceptance length of 2.20 with up to 3 drafted tokens.  Each step here verifies
every active sequence's drafts with one forward of the main model (the target) over the sequence
plus its drafts, emits the target's own greedy tokens up to and including the first disagreement
(or one past the last draft), and drafts up to ``k`` new tokens by applying the one MTP layer
recursively, as Megatron-Core's repeated-layer MTP does in training: depth ``j`` reads depth
``j-1``'s hidden state and the embedding of the token ``j`` places ahead, and the shared output
head turns it into a token.  Only target tokens are ever emitted, so the output is plain greedy
decoding's; the drafts decide how many tokens one target forward yields.

The main hidden states the drafter needs come from the verification forward: positions before the
last emitted token saw only verified tokens (causal attention), and the MTP layer at the last
emitted token's position would need the unknown token after it, so nothing is recomputed.  As in
:mod:`joyai_megatron.stages.generate`, there is no KV cache (every forward re-runs whole packed
sequences: this measures acceptance, not speed).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from joyai_megatron.stages.generate import pack_sequences
from joyai_megatron.stages.logprobs import mtp_skipped
from joyai_megatron.training.checkpoint import unwrap


@dataclass
class AcceptanceStats:
    """Counts over all sequences; ``prefills`` are the first target forwards (nothing to verify)."""

    max_draft: int
    prefills: int = 0
    verify_steps: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    drafted_at_depth: list[int] = field(default_factory=list)
    accepted_at_depth: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.drafted_at_depth = self.drafted_at_depth or [0] * self.max_draft
        self.accepted_at_depth = self.accepted_at_depth or [0] * self.max_draft

    def summary(self) -> dict[str, Any]:
        """``acceptance_length``: tokens per verifying forward (accepted drafts + the target's own);
        ``tokens_per_target_forward`` also counts the prefills and the cut at stop tokens."""
        return {
            "max_draft_tokens": self.max_draft,
            "acceptance_length": (self.accepted + self.verify_steps) / max(self.verify_steps, 1),
            "acceptance_ratio": self.accepted / max(self.drafted, 1),
            "tokens_per_target_forward": self.emitted / max(self.prefills + self.verify_steps, 1),
            "acceptance_ratio_at_depth": [
                a / max(d, 1) for a, d in zip(self.accepted_at_depth, self.drafted_at_depth, strict=True)
            ],
            "target_forwards": self.prefills + self.verify_steps,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "emitted": self.emitted,
        }


def _hidden_and_head(*, hidden_states: torch.Tensor, output_weight: torch.Tensor | None, **_: Any) -> tuple:
    """GPTModel ``output_processor``: the final (normed) hidden states and the head's weight."""
    return hidden_states, output_weight


def _argmax_at(gpt: Any, hidden: torch.Tensor, rows: Sequence[int], weight: torch.Tensor | None) -> list[int]:
    """Greedy tokens of the shared output head at packed ``rows`` of ``hidden`` ``[T, 1, h]``."""
    picked = hidden.index_select(0, torch.tensor(list(rows), device=hidden.device))
    logits, _ = gpt.output_layer(picked, weight=weight, runtime_gather_output=True)
    return gpt._scale_logits(logits)[:, 0].float().argmax(-1).tolist()


def _mtp_hidden(
    gpt: Any, sequences: list[list[int]], main_hidden: list[torch.Tensor], depth: int
) -> torch.Tensor:
    """Depth-``depth`` MTP hidden states over the packed ``sequences``, from their main hidden states.

    Each application rolls the tokens one further left inside every sequence (Megatron-Core's MTP
    layer does the roll), so depth ``j`` at position ``i`` combines depth ``j-1``'s state at ``i``
    with token ``i+j`` and predicts token ``i+j+1``.
    """
    packed = pack_sequences(sequences, main_hidden[0].device)
    hidden = torch.cat(main_hidden, dim=0)
    ids, positions = packed.tokens, packed.positions
    layers = gpt.mtp.layers
    for d in range(depth):
        hidden, ids, positions, _ = layers[min(d, len(layers) - 1)](
            input_ids=ids,
            position_ids=positions,
            hidden_states=hidden,
            attention_mask=None,
            packed_seq_params=packed.params,
            embedding=gpt.embedding,
        )
    return hidden


@torch.no_grad()
def speculative_generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Collection[int],
    num_draft_tokens: int = 3,
) -> tuple[list[list[int]], AcceptanceStats]:
    """Greedy continuations (as :func:`greedy_generate`) and the drafter's acceptance counts."""
    gpt = unwrap(model)
    if getattr(gpt, "mtp", None) is None:
        raise ValueError("speculative decoding needs the model's MTP block (model.mtp_enabled)")
    if num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
    was_training = model.training
    model.eval()
    stats = AcceptanceStats(num_draft_tokens)
    outputs: list[list[int]] = [[] for _ in prompts]
    drafts: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    try:
        while active:
            verify = [list(prompts[i]) + outputs[i] + drafts[i] for i in active]
            packed = pack_sequences(verify, next(model.parameters()).device)
            with mtp_skipped(model):
                hidden, weight = model(
                    packed.tokens,
                    packed.positions,
                    None,
                    packed_seq_params=packed.params,
                    output_processor=_hidden_and_head,
                )
            rows = [
                packed.starts[k] + len(prompts[i]) + len(outputs[i]) - 1 + j
                for k, i in enumerate(active)
                for j in range(len(drafts[i]) + 1)
            ]
            greedy = iter(_argmax_at(gpt, hidden, rows, weight))
            keep: dict[int, torch.Tensor] = {}
            for k, i in enumerate(active):
                target = [next(greedy) for _ in range(len(drafts[i]) + 1)]
                accepted = 0
                while accepted < len(drafts[i]) and drafts[i][accepted] == target[accepted]:
                    accepted += 1
                if drafts[i]:
                    stats.verify_steps += 1
                    stats.drafted += len(drafts[i])
                    stats.accepted += accepted
                    for j in range(len(drafts[i])):
                        stats.drafted_at_depth[j] += 1
                        stats.accepted_at_depth[j] += j < accepted
                else:
                    stats.prefills += 1
                verified = len(prompts[i]) + len(outputs[i]) + accepted  # positions whose inputs are verified
                new = target[: accepted + 1]
                for n, token in enumerate(new):
                    if token in stop_ids or len(outputs[i]) + n + 1 >= max_new_tokens:
                        new = new[: n + 1]
                        break
                outputs[i] += new
                stats.emitted += len(new)
                drafts[i] = []
                if new[-1] not in stop_ids and len(outputs[i]) < max_new_tokens:
                    keep[i] = hidden[packed.starts[k] : packed.starts[k] + verified]
            active = list(keep)
            _draft(gpt, prompts, outputs, drafts, keep, weight, num_draft_tokens, max_new_tokens)
    finally:
        model.train(was_training)
    return outputs, stats


def _draft(
    gpt: Any,
    prompts: Sequence[Sequence[int]],
    outputs: list[list[int]],
    drafts: list[list[int]],
    main_hidden: dict[int, torch.Tensor],
    weight: torch.Tensor | None,
    k: int,
    max_new_tokens: int,
) -> None:
    """Fill ``drafts[i]`` with up to ``k`` tokens (no more than the tokens still to generate - 1).

    ``main_hidden[i]`` holds the verified positions ``0..L-2`` of sequence ``i`` (``L`` tokens); the
    rows the MTP layer would read beyond them only feed later positions (causal), so zeros do.
    """
    wanted = {i: min(k, max_new_tokens - len(outputs[i]) - 1) for i in main_hidden}
    for depth in range(1, k + 1):
        group = [i for i in main_hidden if wanted[i] >= depth]
        if not group:
            return
        sequences = [list(prompts[i]) + outputs[i] + drafts[i] for i in group]
        hidden = [
            torch.cat(
                [
                    main_hidden[i],
                    main_hidden[i].new_zeros(len(s) - len(main_hidden[i]), *main_hidden[i].shape[1:]),
                ]
            )
            for i, s in zip(group, sequences, strict=True)
        ]
        mtp = _mtp_hidden(gpt, sequences, hidden, depth)
        starts = pack_sequences(sequences, mtp.device).starts
        # depth d at the last verified position (L-2) predicts token L-1+d: the next draft
        rows = [start + len(main_hidden[i]) - 1 for start, i in zip(starts, group, strict=True)]
        for i, token in zip(group, _argmax_at(gpt, mtp, rows, weight), strict=True):
            drafts[i].append(token)
