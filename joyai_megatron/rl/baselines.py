"""The baselines FiberPO is compared with: GRPO (token-level PPO clip) and GSPO (sequence ratio).

Both use the same seq-mean-token-mean aggregation, advantage shapes and optional KL term as
`fiberpo_loss`, so a recipe can switch the objective without touching anything else.
"""

from __future__ import annotations

from typing import Unpack

import torch

from joyai_megatron.rl.aggregation import (
    check_token_inputs,
    masked_log_ratio,
    masked_token_max,
    ratio_metrics,
    seq_mean_token_mean,
    token_advantages,
    token_counts,
)
from joyai_megatron.rl.kl import PGTerms, add_kl_penalty


def _token_fraction(flags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (flags & mask).sum().float() / mask.sum().clamp(min=1)


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    **terms: Unpack[PGTerms],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO / PPO-clip: J = mean_seq mean_t min(r A, clip(r, 1 - eps_low, 1 + eps_high) A).

    Decoupled eps_low / eps_high (DAPO's clip-higher uses e.g. 0.2 / 0.28). `dual_clip` = c > 1
    (Ye et al. 2020) additionally bounds the objective of A < 0 tokens below by c * A, so a token
    whose ratio exploded cannot dominate the batch. Metrics: `clip_low_frac` / `clip_high_frac` are
    tokens whose clip is active (gradient zero), `dual_clip_frac` tokens capped by the dual clip.
    """
    mask = check_token_inputs(logprobs, old_logprobs, response_mask)
    if not (eps_low >= 0 and eps_high >= 0):
        raise ValueError(f"eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    log_ratio = masked_log_ratio(logprobs, old_logprobs, mask)
    adv = token_advantages(advantages, mask, log_ratio.dtype)
    ratio = log_ratio.exp()
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    objective = torch.minimum(ratio * adv, clipped * adv)
    if dual_clip is not None:
        objective = torch.where(adv < 0, torch.maximum(objective, dual_clip * adv), objective)
    pg_loss = -seq_mean_token_mean(objective, mask, terms.get("num_sequences"))

    with torch.no_grad():
        metrics = {"pg_loss": pg_loss.detach(), **ratio_metrics(log_ratio, mask)}
        metrics["clip_low_frac"] = _token_fraction((adv < 0) & (ratio < 1.0 - eps_low), mask)
        metrics["clip_high_frac"] = _token_fraction((adv > 0) & (ratio > 1.0 + eps_high), mask)
        if dual_clip is not None:
            metrics["dual_clip_frac"] = _token_fraction((adv < 0) & (ratio > dual_clip), mask)
    return add_kl_penalty(pg_loss, metrics, logprobs, mask, terms)


def gspo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    **terms: Unpack[PGTerms],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (arXiv 2507.18071): the PPO clip on the length-normalised sequence ratio.

    s = exp((1/T) sum_t log r_t); J = mean_seq min(s A, clip(s, 1 - eps_low, 1 + eps_high) A).
    With [batch, T] advantages this is GSPO-token: s_t = sg[s] * pi_t / sg[pi_t] has the value of s
    and the gradient s * grad log pi_t, so each token may carry its own advantage; with a constant
    advantage per sequence the two coincide. Defaults are the GSPO paper's 3e-4 / 4e-4.
    Metrics: `seq_ratio_*` over sequences; clip fractions over tokens (as the GSPO paper reports).
    """
    mask = check_token_inputs(logprobs, old_logprobs, response_mask)
    if not (eps_low >= 0 and eps_high >= 0):
        raise ValueError(f"eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
    log_ratio = masked_log_ratio(logprobs, old_logprobs, mask)
    adv = token_advantages(advantages, mask, log_ratio.dtype)
    counts = token_counts(mask, log_ratio.dtype)
    log_seq_ratio = log_ratio.sum(dim=-1) / counts.clamp(min=1.0)
    log_token_ratio = log_seq_ratio.detach()[:, None] + log_ratio - log_ratio.detach()
    ratio = torch.where(mask, log_token_ratio.exp(), torch.zeros_like(log_ratio))
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    objective = torch.minimum(ratio * adv, clipped * adv)
    pg_loss = -seq_mean_token_mean(objective, mask, terms.get("num_sequences"))

    with torch.no_grad():
        valid = counts > 0
        seq_ratio = log_seq_ratio.exp()
        metrics = {"pg_loss": pg_loss.detach(), **ratio_metrics(log_ratio, mask)}
        metrics["seq_ratio_mean"] = (seq_ratio * valid).sum() / valid.sum().clamp(min=1)
        metrics["seq_ratio_max"] = masked_token_max(seq_ratio, valid)
        metrics["clip_low_frac"] = _token_fraction((adv < 0) & (ratio < 1.0 - eps_low), mask)
        metrics["clip_high_frac"] = _token_fraction((adv > 0) & (ratio > 1.0 + eps_high), mask)
    return add_kl_penalty(pg_loss, metrics, logprobs, mask, terms)
