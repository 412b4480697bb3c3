"""FiberPO (Fibration Policy Optimization, arXiv 2603.08239; JoyAI-LLM Flash report Eqs. 1-5).

For trajectory tau with T valid tokens and rho_t = log r_t = log pi_theta - log pi_old:

    log s+ = (1/T) sum_t max(rho_t, 0)          log s- = (1/T) sum_t max(-rho_t, 0)
    log w_base = g(log s+, C+, T) - g(log s-, C-, T)
    g(x, C, T) = x                         |x| <= C                 pass-through
               = sign(x)(T+1)C - T x       C < |x| < (1 + 1/T)C     rollback
               = 0                         otherwise                gated
    l_i = sign(rho_i),  u_i = l_i rho_i - log s^(l_i),  v_i = -log s^(-l_i)
    log r_fiber(i) = clip(l_i u_i, -eps, eps) - clip(l_i v_i, -eps, eps)
    G_i = w_base * r_fiber(i),   J = (1/B) sum_tau (1/T) sum_t G_t A_t,   loss = -J

Differentiability. Everything above is differentiated as written; only the advantages and
pi_old are data. Consequences, each tested:
- With no gate or clip active, log G_i = rho_i identically, so d log G_i / d rho_j = delta_ij:
  the Jacobian is the identity and at r = 1 the gradient is the plain policy gradient.
- In pass-through every token gets d log w_base / d rho_j = +1/T. In the rollback band dg/dx = -T,
  so each token of the rolled-back channel gets d log w_base / d rho_j = -1 instead (for the
  negative channel via d log s- / d rho_j = -1/T and the minus sign in front of g(log s-)). For the advantage
  sign that drove the channel out (A > 0 pushes rho up, A < 0 down), gradient ascent on J now
  moves those tokens back toward the budget: the restoring gradient. The value is continuous at
  both band edges (C at |x| = C, 0 at (1 + 1/T)C).
- Gated channels contribute neither value nor gradient; a clipped residual term likewise.
- G_i depends only on its own trajectory's tokens: the Jacobian is block-diagonal.
Ties are resolved one way throughout: rho = 0 counts as positive (l = +1, positive channel), and
|x| equal to a budget or to eps counts as inside (pass-through, unclipped). Splitting the channels
with `where` (not two ReLUs, whose subgradient at 0 is 0 for both) keeps
d(log s+ - log s-)/d rho_j = 1/T exactly at r = 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Unpack

import torch

from joyai_megatron.rl.aggregation import (
    check_token_inputs,
    masked_log_ratio,
    masked_token_mean,
    ratio_metrics,
    seq_mean_token_mean,
    token_advantages,
    token_counts,
)
from joyai_megatron.rl.kl import PGTerms, add_kl_penalty

# Defaults (docs/fiberpo.md gives the reasoning): the base budgets equal GSPO's sequence clip range
# when a trajectory drifts one way (C+ = 4e-4, C- = 3e-4), and the token residual stays well inside
# the tighter channel (2 * eps < C-), as the paper asks (eps << delta).
DEFAULT_DELTA = 7e-4
DEFAULT_C_MINUS = 3e-4
DEFAULT_EPS = 1e-4


class GateRegime(IntEnum):
    """Branch of the base gate g taken by an aggregate."""

    PASS = 0
    ROLLBACK = 1
    GATED = 2


class ClipRegime(IntEnum):
    """Side on which a token residual term is clipped."""

    INSIDE = 0
    HIGH = 1
    LOW = 2


def check_eps(eps: float) -> None:
    """The token residual clip must be >= 0 (0 switches the residual off; inf removes the clip)."""
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def channel_budgets(delta: float, c_minus: float) -> tuple[float, float]:
    """(C+, C-) = (delta - c_minus, c_minus), requiring 0 < C- < C+ as the paper does.

    Like the asymmetric clips of DAPO (clip-higher) and GSPO (3e-4 below, 4e-4 above), this leaves
    more room for raising sampled tokens' probabilities than for lowering them.
    `delta` may be `math.inf` (C+ = inf, the positive channel never gates).
    """
    if not (c_minus > 0 and math.isfinite(c_minus)):
        raise ValueError(f"c_minus must be finite and > 0, got {c_minus}")
    c_plus = delta - c_minus
    if not c_minus < c_plus:
        raise ValueError(f"need C- < C+, i.e. c_minus < delta / 2; got delta={delta}, c_minus={c_minus}")
    return c_plus, c_minus


def sign_split(log_ratio: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token max(rho, 0) and max(-rho, 0), with rho = 0 assigned to the positive channel."""
    zeros = torch.zeros_like(log_ratio)
    positive = mask & (log_ratio.detach() >= 0)
    negative = mask & ~positive
    return torch.where(positive, log_ratio, zeros), torch.where(negative, -log_ratio, zeros)


def base_gate(x: torch.Tensor, budget: float, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate g(x, C, n) and the branch taken (GateRegime codes, int8).

    `n` is the number of tokens averaged into x (T for a trajectory), so the band is C/n wide: in
    terms of the summed drift n*x it is always exactly one budget wide, with slope -1.
    """
    if math.isinf(budget):
        return x, torch.full_like(x, GateRegime.PASS, dtype=torch.int8)
    size = x.detach().abs()
    passing = size <= budget
    rolling = ~passing & (size < (1.0 + 1.0 / n) * budget)
    rollback = torch.sign(x.detach()) * (n + 1.0) * budget - n * x
    value = torch.where(passing, x, torch.where(rolling, rollback, torch.zeros_like(x)))
    regime = torch.full_like(x, GateRegime.GATED, dtype=torch.int8)
    regime = torch.where(rolling, int(GateRegime.ROLLBACK), regime).to(torch.int8)
    regime = torch.where(passing, int(GateRegime.PASS), regime).to(torch.int8)
    return value, regime


def symmetric_clip(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """clip(x, -eps, eps) with gradient 1 on [-eps, eps] (boundary included), and ClipRegime codes."""
    if math.isinf(eps):
        return x, torch.full_like(x, ClipRegime.INSIDE, dtype=torch.int8)
    high, low = x.detach() > eps, x.detach() < -eps
    value = torch.where(high, torch.full_like(x, eps), torch.where(low, torch.full_like(x, -eps), x))
    regime = torch.where(high, int(ClipRegime.HIGH), torch.where(low, int(ClipRegime.LOW), 0))
    return value, regime.to(torch.int8)


@dataclass(frozen=True)
class FiberResidual:
    """The token-level residual: log r_fiber and the clip regime of its u and v terms."""

    log_fiber: torch.Tensor
    u_regime: torch.Tensor
    v_regime: torch.Tensor


def fiber_residual(
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    log_s_pos: torch.Tensor,
    log_s_neg: torch.Tensor,
    eps: float,
) -> FiberResidual:
    """log r_fiber(i) = clip(l u) - clip(l v), with the trajectory's channel aggregates [batch].

    Unclipped it equals rho_i - (log s+ - log s-) = rho_i - mean_t rho_t: the token's ratio measured
    relative to its trajectory, so a bounded eps bounds how far one token's weight may stray from
    the weight the base gate gives the whole trajectory.
    """
    sign = torch.where(log_ratio.detach() >= 0, 1.0, -1.0).to(log_ratio.dtype)
    pos, neg = log_s_pos[:, None], log_s_neg[:, None]
    own = torch.where(sign > 0, pos, neg)
    opposite = torch.where(sign > 0, neg, pos)
    u = sign * log_ratio - own
    v = -opposite
    clipped_u, u_regime = symmetric_clip(sign * u, eps)
    clipped_v, v_regime = symmetric_clip(sign * v, eps)
    log_fiber = torch.where(mask, clipped_u - clipped_v, torch.zeros_like(log_ratio))
    inside = torch.zeros_like(u_regime)
    return FiberResidual(log_fiber, torch.where(mask, u_regime, inside), torch.where(mask, v_regime, inside))


@dataclass(frozen=True)
class FiberPOWeights:
    """Everything FiberPO computes before the advantage: log G and its parts, per regime."""

    log_weight: torch.Tensor  # [batch, T] log G_i, zero on padding
    log_base: torch.Tensor  # [batch] log w_base
    log_s_pos: torch.Tensor  # [batch]
    log_s_neg: torch.Tensor  # [batch]
    gate_pos: torch.Tensor  # [batch] GateRegime of the positive channel
    gate_neg: torch.Tensor  # [batch]
    fiber: FiberResidual


def fiberpo_log_weights(
    log_ratio: torch.Tensor, mask: torch.Tensor, *, c_plus: float, c_minus: float, eps: float
) -> FiberPOWeights:
    """log G_i = g(log s+, C+, T) - g(log s-, C-, T) + log r_fiber(i) for masked log ratios."""
    n = token_counts(mask, log_ratio.dtype).clamp(min=1.0)
    pos, neg = sign_split(log_ratio, mask)
    log_s_pos, log_s_neg = pos.sum(dim=-1) / n, neg.sum(dim=-1) / n
    gated_pos, gate_pos = base_gate(log_s_pos, c_plus, n)
    gated_neg, gate_neg = base_gate(log_s_neg, c_minus, n)
    log_base = gated_pos - gated_neg
    fiber = fiber_residual(log_ratio, mask, log_s_pos, log_s_neg, eps)
    log_weight = torch.where(mask, log_base[:, None] + fiber.log_fiber, torch.zeros_like(log_ratio))
    return FiberPOWeights(log_weight, log_base, log_s_pos, log_s_neg, gate_pos, gate_neg, fiber)


def gate_fractions(prefix: str, regime: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fraction of valid sequences in each GateRegime, as `{prefix}_{pass,rollback,gated}_frac`."""
    total = valid.sum().clamp(min=1)
    return {
        f"{prefix}_{r.name.lower()}_frac": ((regime == r) & valid).sum().float() / total for r in GateRegime
    }


def fiber_clip_fractions(fiber: FiberResidual, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fraction of valid tokens whose u term is clipped high / low, whose v term is clipped, any."""
    total = mask.sum().clamp(min=1)
    u_high = (fiber.u_regime == ClipRegime.HIGH) & mask
    u_low = (fiber.u_regime == ClipRegime.LOW) & mask
    v_clip = (fiber.v_regime != ClipRegime.INSIDE) & mask
    return {
        "fiber_u_clip_high_frac": u_high.sum().float() / total,
        "fiber_u_clip_low_frac": u_low.sum().float() / total,
        "fiber_v_clip_frac": v_clip.sum().float() / total,
        "fiber_clip_frac": (u_high | u_low | v_clip).sum().float() / total,
    }


def weighted_pg_loss(
    logprobs: torch.Tensor,
    log_weight: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    terms: PGTerms,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-seq_mean_token_mean(G * A) + KL term, with `pg_loss`, `weight_mean` and `kl` metrics."""
    weight = torch.where(mask, log_weight.exp(), torch.zeros_like(log_weight))
    pg_loss = -seq_mean_token_mean(weight * adv, mask, terms.get("num_sequences"))
    metrics = {"pg_loss": pg_loss.detach(), "weight_mean": masked_token_mean(weight.detach(), mask)}
    return add_kl_penalty(pg_loss, metrics, logprobs, mask, terms)


def fiber_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    log_weights: Callable[[torch.Tensor, torch.Tensor], Any],
    eps: float,
    terms: PGTerms,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any, torch.Tensor]:
    """What FiberPO and FiberPO-Domain share around their weights: input checks, the masked log
    ratio, the weighted policy-gradient loss and the ratio/base/fiber metrics.  ``log_weights``
    maps (log_ratio, mask) to the variant's weights (``log_weight``, ``log_base``, ``fiber``).
    Returns (loss, metrics, weights, valid sequences)."""
    mask = check_token_inputs(logprobs, old_logprobs, response_mask)
    check_eps(eps)
    log_ratio = masked_log_ratio(logprobs, old_logprobs, mask)
    adv = token_advantages(advantages, mask, log_ratio.dtype)
    weights = log_weights(log_ratio, mask)
    loss, metrics = weighted_pg_loss(logprobs, weights.log_weight, adv, mask, terms)
    with torch.no_grad():
        valid = token_counts(mask) > 0
        metrics |= ratio_metrics(log_ratio, mask)
        metrics["base_weight_mean"] = (weights.log_base.exp() * valid).sum() / valid.sum().clamp(min=1)
        metrics |= fiber_clip_fractions(weights.fiber, mask)
    return loss, metrics, weights, valid


def fiberpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    delta: float = DEFAULT_DELTA,
    c_minus: float = DEFAULT_C_MINUS,
    eps: float = DEFAULT_EPS,
    **terms: Unpack[PGTerms],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """FiberPO loss -J (plus optional KL) with seq-mean-token-mean aggregation, and its metrics.

    logprobs, old_logprobs, response_mask: [batch, T]; advantages: [batch] or [batch, T].
    delta, c_minus: base budgets C+ = delta - c_minus, C- = c_minus (need c_minus < delta / 2);
    eps: token residual clip (>= 0, may be inf). ``terms``: the KL penalty and the global sequence
    count of micro-batched runs (`PGTerms`). Metrics are detached scalars; `gate_*`
    fractions are over sequences, `fiber_*` fractions, `ratio_*` and `weight_mean` over tokens.
    """
    c_plus, c_neg = channel_budgets(delta, c_minus)
    loss, metrics, weights, valid = fiber_loss(
        logprobs,
        old_logprobs,
        advantages,
        response_mask,
        lambda log_ratio, mask: fiberpo_log_weights(log_ratio, mask, c_plus=c_plus, c_minus=c_neg, eps=eps),
        eps,
        terms,
    )
    with torch.no_grad():
        n_valid = valid.sum().clamp(min=1)
        metrics["log_s_pos_mean"] = (weights.log_s_pos * valid).sum() / n_valid
        metrics["log_s_neg_mean"] = (weights.log_s_neg * valid).sum() / n_valid
        metrics |= gate_fractions("gate_pos", weights.gate_pos, valid)
        metrics |= gate_fractions("gate_neg", weights.gate_neg, valid)
    return loss, metrics
