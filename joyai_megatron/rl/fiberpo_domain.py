"""FiberPO-Domain: the four-level Fibration Gating Hierarchy (domain, prompt group, trajectory, token).

The paper names this variant but publishes no equations; this is our construction, chosen so that
the two properties FiberPO is built on survive (docs/fiberpo.md, "FiberPO-Domain").

Each channel c in {+, -} is aggregated at every level as a token mean, exactly like log s+/- of a
trajectory but over all tokens of the node: A^c_D (domain), A^c_P (prompt group), A^c_tau. The
trajectory's channel is split into telescoping residuals, one per level, and each is gated by the
same gate g as FiberPO with its own budget and its node's token count n:

    log w^c(tau) = g(A^c_D, C^c_D, n_D) + g(A^c_P - A^c_D, C^c_P, n_P) + g(A^c_tau - A^c_P, C^c_tau, T)
    G_i = exp(log w^+ - log w^-) * r_fiber(i)          (FiberPO's r_fiber, from the trajectory's A^c_tau)

so G = w_domain * w_group|domain * w_trajectory|group * r_fiber: the gates compose
multiplicatively, each on the drift its level adds to its parent's.
- With every gate passing, the residuals telescope back to A^c_tau, log G_i = rho_i, and the
  Jacobian is the identity: the on-policy gradient is the plain policy gradient whatever the
  advantages. (Gating full aggregates at every level instead would weight tokens by
  r_i * s_domain * s_group, which is no importance ratio and double-counts the shared drift.)
- Level residuals are signed, which is what the sign(x) of g is for: a group may drift less than
  its domain. Coupling across trajectories appears only through a non-passing domain or group gate:
  that is the point of a domain-level trust region.
- With each trajectory its own domain and group, the group and trajectory residuals are zero and
  the domain gate sees exactly (A^c_tau, T): the loss equals `fiberpo_loss` with the domain budgets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Unpack

import torch

from joyai_megatron.rl.aggregation import (
    token_counts,
)
from joyai_megatron.rl.fiberpo import (
    DEFAULT_C_MINUS,
    DEFAULT_DELTA,
    DEFAULT_EPS,
    FiberResidual,
    base_gate,
    channel_budgets,
    fiber_loss,
    fiber_residual,
    gate_fractions,
    sign_split,
)
from joyai_megatron.rl.kl import PGTerms


def _node_index(ids: torch.Tensor, batch: int, name: str) -> tuple[torch.Tensor, int]:
    """Dense 0..K-1 labels for arbitrary integer node ids [batch]."""
    if ids.shape != (batch,):
        raise ValueError(f"{name} must be [batch] = ({batch},), got {tuple(ids.shape)}")
    uniques, index = torch.unique(ids, return_inverse=True)
    return index, uniques.numel()


def _parent_of(child: torch.Tensor, parent: torch.Tensor, num_children: int) -> torch.Tensor:
    """Parent label of each child node; raises if a child spans two parents (groups must nest)."""
    low = torch.full((num_children,), parent.numel(), dtype=parent.dtype).scatter_reduce(
        0, child, parent, reduce="amin"
    )
    high = torch.full((num_children,), -1, dtype=parent.dtype).scatter_reduce(0, child, parent, reduce="amax")
    if not torch.equal(low, high):
        raise ValueError("every prompt group must lie in a single domain")
    return low


def _node_mean(
    per_seq_sum: torch.Tensor, index: torch.Tensor, size: int, counts: torch.Tensor
) -> torch.Tensor:
    """Token-mean of a channel over each node: (sum of its tokens' parts) / (its token count)."""
    sums = per_seq_sum.new_zeros(size).index_add(0, index, per_seq_sum)
    return sums / counts.clamp(min=1.0)


@dataclass(frozen=True)
class DomainWeights:
    """log G of FiberPO-Domain with its base part and each level's gate regime per sequence."""

    log_weight: torch.Tensor  # [batch, T]
    log_base: torch.Tensor  # [batch] log(w_domain * w_group|domain * w_trajectory|group)
    regimes: dict[str, torch.Tensor]  # "{domain,group,traj}_{pos,neg}" -> [batch] GateRegime
    fiber: FiberResidual


def fiberpo_domain_log_weights(
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    domain_ids: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    budgets: dict[str, tuple[float, float]],
    eps: float,
) -> DomainWeights:
    """log G_i for masked log ratios; `budgets` maps "domain", "group", "traj" to (C+, C-)."""
    batch = log_ratio.shape[0]
    d_idx, num_domains = _node_index(domain_ids, batch, "domain_ids")
    p_idx, num_groups = _node_index(group_ids, batch, "group_ids")
    domain_of_group = _parent_of(p_idx, d_idx, num_groups)
    t_counts = token_counts(mask, log_ratio.dtype)
    p_counts = t_counts.new_zeros(num_groups).index_add(0, p_idx, t_counts)
    d_counts = t_counts.new_zeros(num_domains).index_add(0, d_idx, t_counts)

    channel_log_weight, trajectory_channels, regimes = [], [], {}
    # channel 0 is "+" (budgets C+), channel 1 is "-" (budgets C-)
    for which, (name, part) in enumerate(zip(("pos", "neg"), sign_split(log_ratio, mask), strict=True)):
        per_seq = part.sum(dim=-1)
        traj = per_seq / t_counts.clamp(min=1.0)
        group = _node_mean(per_seq, p_idx, num_groups, p_counts)
        domain = _node_mean(per_seq, d_idx, num_domains, d_counts)
        dom_g, dom_r = base_gate(domain, budgets["domain"][which], d_counts.clamp(min=1.0))
        grp_g, grp_r = base_gate(
            group - domain[domain_of_group], budgets["group"][which], p_counts.clamp(min=1.0)
        )
        trj_g, trj_r = base_gate(traj - group[p_idx], budgets["traj"][which], t_counts.clamp(min=1.0))
        channel_log_weight.append(dom_g[d_idx] + grp_g[p_idx] + trj_g)
        trajectory_channels.append(traj)
        regimes |= {f"domain_{name}": dom_r[d_idx], f"group_{name}": grp_r[p_idx], f"traj_{name}": trj_r}

    log_base = channel_log_weight[0] - channel_log_weight[1]
    fiber = fiber_residual(log_ratio, mask, trajectory_channels[0], trajectory_channels[1], eps)
    log_weight = torch.where(mask, log_base[:, None] + fiber.log_fiber, torch.zeros_like(log_ratio))
    return DomainWeights(log_weight, log_base, regimes, fiber)


def fiberpo_domain_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    domain_ids: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    delta: float = DEFAULT_DELTA,
    c_minus: float = DEFAULT_C_MINUS,
    group_delta: float = DEFAULT_DELTA,
    group_c_minus: float = DEFAULT_C_MINUS,
    domain_delta: float = DEFAULT_DELTA,
    domain_c_minus: float = DEFAULT_C_MINUS,
    eps: float = DEFAULT_EPS,
    **terms: Unpack[PGTerms],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """FiberPO-Domain loss and metrics; arguments as `fiberpo_loss` plus the hierarchy.

    domain_ids, group_ids: integer [batch] labels (each group inside one domain). Each level has its
    own (delta, c_minus) pair, split into (C+, C-) as in FiberPO. Gate metrics are reported per
    level and channel as fractions of sequences: `{domain,group,traj}_{pos,neg}_{regime}_frac`.
    Aggregates are over the sequences present in this call: pass whole domains and groups, since a
    node split across calls would be gated on a partial aggregate.
    """
    budgets = {
        "domain": channel_budgets(domain_delta, domain_c_minus),
        "group": channel_budgets(group_delta, group_c_minus),
        "traj": channel_budgets(delta, c_minus),
    }
    loss, metrics, weights, valid = fiber_loss(
        logprobs,
        old_logprobs,
        advantages,
        response_mask,
        lambda log_ratio, mask: fiberpo_domain_log_weights(
            log_ratio, mask, domain_ids, group_ids, budgets=budgets, eps=eps
        ),
        eps,
        terms,
    )
    with torch.no_grad():
        for key, regime in weights.regimes.items():
            metrics |= gate_fractions(key, regime, valid)
    return loss, metrics
