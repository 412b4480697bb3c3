"""Advantages of multi-turn trajectories: trajectory level (default) or per turn.

Trajectory level (``rl.agentic.advantage_level: trajectory``): the episode's reward goes through
the single-turn group normalisation (``rl/advantages.py``) and every policy token of the episode
shares the advantage. This is what FiberPO, FiberPO-Domain, GRPO and GSPO consume unchanged: the
tool replies are simply outside the loss mask.

Per turn (``turn``): turn k of episode i gets the return from that turn on,
``G_ik = R_i - penalty * (tool errors of turns k, k+1, ...)``, centred (and scaled) by the group's
episode returns ``G_i0``; a turn is charged for its own failed tool calls and later ones, never for
earlier ones. With ``tool_error_penalty: 0`` this equals the trajectory level. The per-token
advantages are [batch, T] tensors, which all four losses accept (GSPO then is GSPO-token).
"""

from __future__ import annotations

import torch

from joyai_megatron.rl.agentic.episodes import EpisodeInfo


def turn_returns(reward: float, info: EpisodeInfo, penalty: float) -> list[float]:
    """G_k for every turn k of one episode."""
    errors = list(info.turn_errors) + [0] * max(info.turns - len(info.turn_errors), 0)
    out, tail = [], 0
    for k in reversed(range(len(errors))):
        tail += errors[k]
        out.append(reward - penalty * tail)
    return out[::-1] or [reward]


def per_turn_advantages(
    rewards: list[float],
    infos: list[EpisodeInfo],
    group_size: int,
    penalty: float,
    *,
    scale_by_std: bool,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, list[list[float]]]:
    """(episode returns G_i0 [N], per-response-token advantages of every episode). Groups whose
    returns are all equal get zero advantages (dropped by ``filter_zero_variance`` like any other)."""
    returns = [turn_returns(r, info, penalty) for r, info in zip(rewards, infos, strict=True)]
    first = torch.tensor([g[0] for g in returns], dtype=torch.float64)
    grouped = first.view(-1, group_size)
    mean = grouped.mean(1).repeat_interleave(group_size)
    std = grouped.std(1).repeat_interleave(group_size) if scale_by_std else torch.ones_like(mean)
    varied = (grouped.amax(1) > grouped.amin(1)).repeat_interleave(group_size)
    tokens = []
    for i, (g, info) in enumerate(zip(returns, infos, strict=True)):
        if not varied[i]:
            tokens.append([0.0] * len(info.turn_ids))
            continue
        per_turn = [(gk - float(mean[i])) / (float(std[i]) + eps if scale_by_std else 1.0) for gk in g]
        tokens.append([per_turn[min(k, len(per_turn) - 1)] for k in info.turn_ids])
    return first, tokens
