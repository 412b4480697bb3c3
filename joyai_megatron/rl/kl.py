"""Per-token KL estimators to a frozen reference policy (Schulman's k1 and k3).

Both estimate KL(pi_theta || pi_ref) from samples of pi_theta with x = log pi_ref - log pi_theta:
k1 = -x is unbiased but can be negative and has high variance; k3 = exp(x) - x - 1 is non-negative
and low-variance (the "low_var_kl" of verl, the default of TRL and NeMo-RL).
"""

from __future__ import annotations

from typing import Literal

import torch

from joyai_megatron.rl.aggregation import compute_dtype, seq_mean_token_mean

KLEstimator = Literal["k1", "k3"]


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """Per-token KL estimate, differentiable through `logprobs` only."""
    dtype = compute_dtype(logprobs)
    log_ref_ratio = ref_logprobs.detach().to(dtype) - logprobs.to(dtype)
    if estimator == "k1":
        return -log_ref_ratio
    if estimator == "k3":
        return torch.expm1(log_ref_ratio) - log_ref_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1' or 'k3'")


def add_kl_penalty(
    pg_loss: torch.Tensor,
    metrics: dict[str, torch.Tensor],
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    mask: torch.Tensor,
    coef: float,
    estimator: KLEstimator,
    num_sequences: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``pg_loss`` + coef * seq-mean-token-mean KL, and ``metrics`` with the unscaled ``kl``.

    With the penalty off (coef == 0) both come back unchanged, so no reference forward is needed.
    """
    if coef == 0.0:
        return pg_loss, metrics
    if ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    if ref_logprobs.shape != logprobs.shape:
        raise ValueError(f"ref_logprobs shape {tuple(ref_logprobs.shape)} != {tuple(logprobs.shape)}")
    zeros = torch.zeros_like(logprobs, dtype=compute_dtype(logprobs))
    policy = torch.where(mask, logprobs.to(zeros.dtype), zeros)
    ref = torch.where(mask, ref_logprobs.to(zeros.dtype), zeros)
    kl = seq_mean_token_mean(kl_estimate(policy, ref, estimator), mask, num_sequences)
    metrics["kl"] = kl.detach()
    return pg_loss + coef * kl, metrics
