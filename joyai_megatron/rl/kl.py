"""Per-token KL estimators to a frozen reference policy (Schulman's k1 and k3).

Both estimate KL(pi_theta || pi_ref) from samples of pi_theta with x = log pi_ref - log pi_theta:
k1 = -x is unbiased but can be negative and has high variance; k3 = exp(x) - x - 1 is non-negative
and low-variance (the "low_var_kl" of verl, the default of TRL and NeMo-RL).
"""

from __future__ import annotations

from typing import Literal, TypedDict

import torch

from joyai_megatron.rl.aggregation import compute_dtype, seq_mean_token_mean

KLEstimator = Literal["k1", "k3"]


class PGTerms(TypedDict, total=False):
    """The keywords every policy-gradient loss takes besides its own: the KL penalty to a reference
    policy (``kl_coef`` 0 by default: off, no reference needed; ``kl_estimator`` k3) and the global
    sequence count of a micro-batched step (``num_sequences``, see ``seq_mean_token_mean``)."""

    ref_logprobs: torch.Tensor | None
    kl_coef: float
    kl_estimator: KLEstimator
    num_sequences: float | None


def check_pg_terms(terms: PGTerms) -> PGTerms:
    """``terms`` itself, after refusing a keyword no loss knows (a typo must not switch the KL off)."""
    unknown = sorted(set(terms) - set(PGTerms.__annotations__))
    if unknown:
        raise TypeError(f"unexpected loss keyword(s) {unknown}; known: {sorted(PGTerms.__annotations__)}")
    return terms


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
    mask: torch.Tensor,
    terms: PGTerms,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``pg_loss`` + coef * seq-mean-token-mean KL, and ``metrics`` with the unscaled ``kl``.

    With the penalty off (coef == 0) both come back unchanged, so no reference forward is needed.
    """
    coef = check_pg_terms(terms).get("kl_coef", 0.0)
    ref_logprobs = terms.get("ref_logprobs")
    if coef == 0.0:
        return pg_loss, metrics
    if ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    if ref_logprobs.shape != logprobs.shape:
        raise ValueError(f"ref_logprobs shape {tuple(ref_logprobs.shape)} != {tuple(logprobs.shape)}")
    zeros = torch.zeros_like(logprobs, dtype=compute_dtype(logprobs))
    policy = torch.where(mask, logprobs.to(zeros.dtype), zeros)
    ref = torch.where(mask, ref_logprobs.to(zeros.dtype), zeros)
    estimate = kl_estimate(policy, ref, terms.get("kl_estimator", "k3"))
    kl = seq_mean_token_mean(estimate, mask, terms.get("num_sequences"))
    metrics["kl"] = kl.detach()
    return pg_loss + coef * kl, metrics
