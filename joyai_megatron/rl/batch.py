"""From generations to training micro-batches: rewards, group advantages, fixed-shape rows.

A trajectory is one row of ``train.seq_length`` tokens: prompt + response, then padding that forms
its own packed segment (positions restart), so ``pack_batch`` gives one THD sequence per
micro-batch of a fixed total length (pipeline stages exchange fixed shapes). Per-token tensors are
aligned to the *predicting* position j: ``labels[j]`` is token j + 1 and ``loss_mask[j]`` is 1 when
that token belongs to the response, so the log-prob computed at j is the one the loss needs.
With rollout routing replay the engine's routing of input token j sits at packed index
``row * seq_length + j`` of ``routed_experts`` [rows * seq_length, moe_layers, top_k] (int16, -1
where the engine routed nothing: the last response token, padding).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from joyai_megatron.rl.advantages import group_advantages
from joyai_megatron.rl.agentic.episodes import EpisodeInfo
from joyai_megatron.rl.prompts import Prompt
from joyai_megatron.rl.rewards.pool import score_all
from joyai_megatron.rl.rollout.base import Sample


@dataclass
class Trajectory:
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    reward: float
    group: int  # index of the prompt within this rollout (global over data-parallel ranks)
    domain: int
    advantage: float = 0.0
    routed_experts: torch.Tensor | None = None  # Sample.routed_experts (R3)
    # Multi-turn (agentic) trajectories: 1 on the policy's response tokens, 0 on tool replies; the
    # episode's record; per-token advantages when rl.agentic.advantage_level is "turn".
    response_mask: list[int] | None = None
    episode: EpisodeInfo | None = None
    token_advantages: list[float] | None = None


@dataclass
class RolloutStats:
    """Sums over this rank's samples (all-reduced with the other data-parallel ranks for logging)."""

    samples: float = 0.0
    reward: float = 0.0
    solved: float = 0.0  # samples with reward 1 (pass@1 over samples)
    response_tokens: float = 0.0
    stopped: float = 0.0
    groups: float = 0.0
    groups_kept: float = 0.0
    # Multi-turn episodes only (zero otherwise): sums over episodes.
    episodes: float = 0.0
    turns: float = 0.0
    tool_calls: float = 0.0
    tool_errors: float = 0.0
    truncated: float = 0.0
    clean_tool_use: float = 0.0  # episodes that called a tool and no call failed

    def add_episodes(self, trajectories: list[Trajectory]) -> None:
        for info in (t.episode for t in trajectories if t.episode is not None):
            self.episodes += 1
            self.turns += info.turns
            self.tool_calls += info.tool_calls
            self.tool_errors += info.tool_errors
            self.truncated += info.truncated is not None
            self.clean_tool_use += info.tool_calls > 0 and info.tool_errors == 0


def score(
    prompts: list[Prompt],
    groups: list[int],
    generations: list[list[Sample]],
    reward_for: Callable[[Prompt], Callable[[str, str], float]],
    decode: Callable[[list[int]], str],
    domain_index: dict[str, int],
) -> list[Trajectory]:
    """Decode and score every sample (``score_all``: side by side); prompt-major, as
    ``group_advantages`` expects."""
    pairs = [(p, g, s) for p, g, samples in zip(prompts, groups, generations, strict=True) for s in samples]
    rewards = score_all([(reward_for(p), decode(s.token_ids), p.reference) for p, _, s in pairs])
    return [
        Trajectory(
            prompt.token_ids,
            sample.token_ids,
            sample.logprobs,
            reward,
            group,
            domain_index[prompt.domain],
            routed_experts=sample.routed_experts,
        )
        for (prompt, group, sample), reward in zip(pairs, rewards, strict=True)
    ]


def assign_advantages(
    trajectories: list[Trajectory],
    group_size: int,
    *,
    scale_by_std: bool,
    filter_zero_variance: bool,
    stop_token_ids: tuple[int, ...],
    turn_penalty: float | None = None,
) -> tuple[list[Trajectory], RolloutStats]:
    """Group-normalised advantages; returns the kept trajectories and the rollout statistics.
    With ``turn_penalty`` (multi-turn, per-turn advantages; rl/agentic/advantages.py) each
    trajectory also gets per-token advantages and groups are judged by their episode returns."""
    stats = RolloutStats()
    if not trajectories:
        return [], stats
    rewards = torch.tensor([t.reward for t in trajectories], dtype=torch.float64)
    signal = rewards
    if turn_penalty is not None:
        from joyai_megatron.rl.agentic.advantages import per_turn_advantages

        infos = [t.episode or EpisodeInfo(turns=1) for t in trajectories]
        signal, tokens = per_turn_advantages(
            rewards.tolist(), infos, group_size, turn_penalty, scale_by_std=scale_by_std
        )
        for traj, values in zip(trajectories, tokens, strict=True):
            traj.token_advantages = values
    adv = group_advantages(
        signal, group_size, scale_by_std=scale_by_std, filter_zero_variance=filter_zero_variance
    )
    kept = []
    for traj, a, keep in zip(trajectories, adv.advantages.tolist(), adv.keep.tolist(), strict=True):
        traj.advantage = a
        if keep:
            kept.append(traj)
    stats.samples = float(len(trajectories))
    stats.reward = float(rewards.sum())
    stats.solved = float((rewards >= 1.0).sum())
    stats.response_tokens = float(sum(len(t.response_ids) for t in trajectories))
    stats.stopped = float(
        sum(bool(t.response_ids) and t.response_ids[-1] in stop_token_ids for t in trajectories)
    )
    stats.groups, stats.groups_kept = float(adv.num_groups), float(adv.num_kept_groups)
    stats.add_episodes(trajectories)
    return kept, stats


def _row(traj: Trajectory | None, seq_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """One training row: the trajectory's tokens then padding, or all padding for ``None``."""
    row = {
        "tokens": torch.full((seq_length,), pad_id, dtype=torch.long),
        "labels": torch.full((seq_length,), pad_id, dtype=torch.long),
        "loss_mask": torch.zeros(seq_length),
        "rollout_logprobs": torch.zeros(seq_length),
        "position_ids": torch.arange(seq_length),
    }
    if traj is None:
        return row
    p, r = len(traj.prompt_ids), len(traj.response_ids)
    length = p + r
    if length > seq_length:
        raise ValueError(f"trajectory of {length} tokens exceeds train.seq_length={seq_length}")
    tokens = row["tokens"]
    tokens[:length] = torch.tensor(traj.prompt_ids + traj.response_ids)
    row["labels"][: length - 1] = tokens[1:length]
    row["loss_mask"][p - 1 : length - 1] = (
        1.0 if traj.response_mask is None else torch.tensor(traj.response_mask, dtype=torch.float32)
    )
    row["rollout_logprobs"][p - 1 : length - 1] = torch.tensor(traj.rollout_logprobs, dtype=torch.float32)
    row["position_ids"][length:] = torch.arange(seq_length - length)  # the padding is a segment of its own
    return row


def micro_batches(
    trajectories: list[Trajectory],
    num_microbatches: int,
    micro_batch_size: int,
    seq_length: int,
    pad_id: int,
    first_index: int,
) -> list[dict[str, torch.Tensor]]:
    """``num_microbatches`` batches of ``micro_batch_size`` rows; rows beyond the data are padding
    (loss mask 0), so every data-parallel rank runs the same number of micro-batches."""
    capacity = num_microbatches * micro_batch_size
    # With rollout routing (R3) every micro-batch carries a routing tensor, an all-padding one
    # included (all UNSET: its routers spread the filler tokens round-robin, as padding elsewhere).
    route_shape = next(
        (tuple(t.routed_experts.shape[1:]) for t in trajectories if t.routed_experts is not None), None
    )
    if len(trajectories) > capacity:
        raise ValueError(f"{len(trajectories)} trajectories exceed the mini-batch capacity {capacity}")
    slots: list[Trajectory | None] = list(trajectories) + [None] * (capacity - len(trajectories))
    out = []
    for k in range(num_microbatches):
        rows = slots[k * micro_batch_size : (k + 1) * micro_batch_size]
        built = [_row(t, seq_length, pad_id) for t in rows]
        batch = {key: torch.stack([b[key] for b in built]) for key in built[0]}
        batch["advantages"] = _advantages(rows, seq_length)
        batch["group_ids"] = torch.tensor([t.group if t else -1 - i for i, t in enumerate(rows)])
        batch["domain_ids"] = torch.tensor([t.domain if t else -1 for t in rows])
        batch["mb_index"] = torch.tensor(first_index + k)
        if route_shape is not None:
            batch["routed_experts"] = _routes(rows, seq_length, route_shape)
        out.append(batch)
    return out


def _advantages(rows: list[Trajectory | None], seq_length: int) -> torch.Tensor:
    """[rows] sequence advantages, or [rows, seq_length] aligned like ``loss_mask`` when any row
    carries per-token (per-turn) advantages."""
    if not any(t is not None and t.token_advantages is not None for t in rows):
        return torch.tensor([t.advantage if t else 0.0 for t in rows], dtype=torch.float32)
    out = torch.zeros(len(rows), seq_length)
    for i, t in enumerate(rows):
        if t is None:
            continue
        p, values = len(t.prompt_ids), t.token_advantages
        if values is None:
            values = [t.advantage] * len(t.response_ids)
        out[i, p - 1 : p - 1 + len(values)] = torch.tensor(values, dtype=torch.float32)
    return out


def _routes(rows: list[Trajectory | None], seq_length: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The rows' engine routing in packed order; -1 (UNSET) where the engine routed nothing."""
    out = torch.full((len(rows) * seq_length, *shape), -1, dtype=torch.int16)
    for i, traj in enumerate(rows):
        if traj is None:
            continue
        fed = len(traj.prompt_ids) + len(traj.response_ids) - 1
        routes = traj.routed_experts
        if routes is None or tuple(routes.shape) != (fed, *shape):
            raise ValueError(
                f"rollout routing of shape {None if routes is None else tuple(routes.shape)} for a "
                f"trajectory of {fed} input tokens; expected {(fed, *shape)}"
            )
        out[i * seq_length : i * seq_length + fed] = routes
    return out


def split_evenly(items: list, parts: int) -> list[list]:
    """``parts`` contiguous chunks whose sizes differ by at most one (mini-batches of a rollout)."""
    base, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out
