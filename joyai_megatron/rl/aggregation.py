"""Masking and the seq-mean-token-mean reduction shared by every RL loss.

Every loss here takes per-token tensors of shape [batch, T] plus a response mask; padding positions
may hold garbage (even inf or NaN logprobs), so they are zeroed with `torch.where` before any
`exp`, which keeps both the value and the gradient finite.
"""

from __future__ import annotations

import torch


def check_token_inputs(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """Validate shapes and return the mask as bool [batch, T]."""
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [batch, T], got shape {tuple(logprobs.shape)}")
    if old_logprobs.shape != logprobs.shape or response_mask.shape != logprobs.shape:
        raise ValueError(
            "logprobs, old_logprobs and response_mask must share one shape, got "
            f"{tuple(logprobs.shape)}, {tuple(old_logprobs.shape)}, {tuple(response_mask.shape)}"
        )
    return response_mask.bool()


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16 inputs (ratios of near-equal logprobs need it), fp64 kept as is."""
    return torch.promote_types(tensor.dtype, torch.float32)


def masked_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log r = log pi_theta - log pi_old in at least fp32, exactly zero (and gradient-free) on padding."""
    dtype = compute_dtype(logprobs)
    log_ratio = logprobs.to(dtype) - old_logprobs.detach().to(dtype)
    return torch.where(mask, log_ratio, torch.zeros_like(log_ratio))


def token_advantages(advantages: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Broadcast [batch] (sequence-level) or [batch, T] (token-level) advantages to [batch, T].

    Advantages are data, never differentiated: the result is detached and zero on padding.
    """
    adv = advantages.detach().to(dtype)
    if adv.dim() == 1:
        if adv.shape[0] != mask.shape[0]:
            raise ValueError(f"advantages [batch] has {adv.shape[0]} entries for batch {mask.shape[0]}")
        adv = adv[:, None].expand(mask.shape)
    elif adv.shape != mask.shape:
        raise ValueError(f"advantages must be [batch] or [batch, T], got shape {tuple(adv.shape)}")
    return torch.where(mask, adv, torch.zeros_like(adv))


def token_counts(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Valid tokens per sequence as a float [batch] tensor."""
    return mask.sum(dim=-1).to(dtype)


def seq_mean_token_mean(
    values: torch.Tensor, mask: torch.Tensor, num_sequences: float | None = None
) -> torch.Tensor:
    """(1/B) * sum_seq (1/T_seq) * sum_t values: every response counts once, whatever its length.

    Sequences with no valid token are skipped. `num_sequences` replaces the local count B when a
    global batch is split over micro-batches or data-parallel ranks, so that summing the returned
    per-shard values gives the global mean.
    """
    counts = token_counts(mask, values.dtype)
    valid = counts > 0
    per_seq = torch.where(mask, values, torch.zeros_like(values)).sum(dim=-1) / counts.clamp(min=1.0)
    total = torch.where(valid, per_seq, torch.zeros_like(per_seq)).sum()
    denom = float(num_sequences) if num_sequences is not None else valid.sum().clamp(min=1).to(total.dtype)
    return total / denom


def masked_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid tokens (a metric helper; 0 when there are none)."""
    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum().clamp(min=1)


def masked_token_max(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max over valid tokens (a metric helper; 0 when there are none)."""
    if not bool(mask.any()):
        return values.new_zeros(())
    return values[mask].max()


def ratio_metrics(log_ratio: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token importance ratio r = pi_theta / pi_old: mean, max and min over valid tokens."""
    ratio = log_ratio.detach().exp()
    return {
        "ratio_mean": masked_token_mean(ratio, mask),
        "ratio_max": masked_token_max(ratio, mask),
        "ratio_min": -masked_token_max(-ratio, mask),
    }
