"""The recipe's ``rl.loss`` as one call, plus the trust-region regime of every token.

All four losses share the seq-mean-token-mean reduction; the stage calls them with
``num_sequences=1`` so a micro-batch returns the *sum* over its sequences of each sequence's
token mean, and Megatron-Core's per-token normalisation divides by the global sequence count
(the ``num_tokens`` the loss function reports), which gives exactly the global mean.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from joyai_megatron.config.schema import RLCfg
from joyai_megatron.rl.aggregation import masked_log_ratio
from joyai_megatron.rl.baselines import grpo_loss, gspo_loss
from joyai_megatron.rl.fiberpo import GateRegime, channel_budgets, fiberpo_log_weights, fiberpo_loss
from joyai_megatron.rl.fiberpo_domain import fiberpo_domain_loss
from joyai_megatron.rl.kl import PGTerms

KL_TYPES = ("k1", "k3")


@dataclass(frozen=True)
class LossInputs:
    """One micro-batch's tensors for the policy loss ([batch, T] unless noted)."""

    logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor  # [batch] or [batch, T]
    mask: torch.Tensor
    ref_logprobs: torch.Tensor | None
    group_ids: torch.Tensor  # [batch]
    domain_ids: torch.Tensor  # [batch]

    @property
    def policy(self) -> tuple[torch.Tensor, ...]:
        """The leading positional arguments of every loss: logprobs, old logprobs, advantages, mask."""
        return self.logprobs, self.old_logprobs, self.advantages, self.mask


# rl.loss -> (rl section, inputs, the keywords every loss takes) -> (loss, metrics)
PolicyLoss = Callable[[RLCfg, LossInputs, PGTerms], tuple[torch.Tensor, dict[str, torch.Tensor]]]
LOSSES: dict[str, PolicyLoss] = {}


def register_loss(name: str) -> Callable[[PolicyLoss], PolicyLoss]:
    """Make ``rl.loss: name`` select the decorated loss (a new objective is one function here)."""

    def register(fn: PolicyLoss) -> PolicyLoss:
        LOSSES[name] = fn
        return fn

    return register


def _clip_kwargs(rl: RLCfg) -> dict[str, float]:
    out = {}
    if rl.clip_eps_low is not None:
        out["eps_low"] = rl.clip_eps_low
    if rl.clip_eps_high is not None:
        out["eps_high"] = rl.clip_eps_high
    return out


@register_loss("fiberpo")
def _fiberpo(rl: RLCfg, x: LossInputs, common: PGTerms):
    return fiberpo_loss(*x.policy, delta=rl.delta, c_minus=rl.c_minus, eps=rl.eps, **common)


@register_loss("fiberpo_domain")
def _fiberpo_domain(rl: RLCfg, x: LossInputs, common: PGTerms):
    budgets = {
        f"{level}{name}": getattr(rl, f"{level}{name}")
        for level in ("", "group_", "domain_")
        for name in ("delta", "c_minus")
    }
    return fiberpo_domain_loss(*x.policy, x.domain_ids, x.group_ids, eps=rl.eps, **budgets, **common)


@register_loss("grpo")
def _grpo(rl: RLCfg, x: LossInputs, common: PGTerms):
    return grpo_loss(*x.policy, dual_clip=rl.dual_clip, **_clip_kwargs(rl), **common)


@register_loss("gspo")
def _gspo(rl: RLCfg, x: LossInputs, common: PGTerms):
    return gspo_loss(*x.policy, **_clip_kwargs(rl), **common)


def check_rl_config(rl: RLCfg) -> None:
    """Fail on a bad ``rl`` section before any model is built."""
    if rl.loss not in LOSSES:
        raise ValueError(f"rl.loss must be one of {tuple(LOSSES)}, got {rl.loss!r}")
    if rl.kl_type not in KL_TYPES:
        raise ValueError(f"rl.kl_type must be one of {KL_TYPES}, got {rl.kl_type!r}")
    if rl.loss.startswith("fiberpo"):
        channel_budgets(rl.delta, rl.c_minus)
        if rl.loss == "fiberpo_domain":
            channel_budgets(rl.group_delta, rl.group_c_minus)
            channel_budgets(rl.domain_delta, rl.domain_c_minus)
    if rl.tis_clip is not None and not rl.tis_clip > 0:
        raise ValueError(f"rl.tis_clip must be > 0 (or null), got {rl.tis_clip}")
    if rl.group_size < 2 and rl.normalize_std:
        raise ValueError("rl.group_size must be >= 2 for group-normalised advantages")


def policy_loss(rl: RLCfg, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum over sequences of the chosen loss's per-sequence objective (see module docstring)."""
    common = PGTerms(
        ref_logprobs=inputs.ref_logprobs, kl_coef=rl.kl_coef, kl_estimator=rl.kl_type, num_sequences=1.0
    )
    return LOSSES[rl.loss](rl, inputs, common)


@torch.no_grad()
def token_regimes(
    rl: RLCfg,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Token counts per trust-region regime, as {name: count} over valid tokens.

    FiberPO: a token belongs to its sign channel (rho >= 0: +), and takes that channel's gate branch
    in its trajectory (pass / rollback / gated). GRPO / GSPO: the clip is active (gradient zero)
    for A < 0 below 1 - eps_low ("clip_low") or A > 0 above 1 + eps_high ("clip_high"), else "pass".
    FiberPO-Domain reports its per-level sequence fractions through the loss metrics instead.
    """
    valid = mask.bool()
    log_ratio = masked_log_ratio(logprobs, old_logprobs, valid)
    if rl.loss == "fiberpo":
        c_plus, c_minus = channel_budgets(rl.delta, rl.c_minus)
        w = fiberpo_log_weights(log_ratio, valid, c_plus=c_plus, c_minus=c_minus, eps=rl.eps)
        regime = torch.where(log_ratio >= 0, w.gate_pos[:, None], w.gate_neg[:, None])
        return {f"gate_{r.name.lower()}": ((regime == r) & valid).sum().float() for r in GateRegime}
    if rl.loss in ("grpo", "gspo"):
        defaults = (0.2, 0.2) if rl.loss == "grpo" else (3e-4, 4e-4)
        low = rl.clip_eps_low if rl.clip_eps_low is not None else defaults[0]
        high = rl.clip_eps_high if rl.clip_eps_high is not None else defaults[1]
        if rl.loss == "gspo":
            counts = valid.sum(-1).clamp(min=1)
            log_ratio = (log_ratio.sum(-1) / counts)[:, None].expand_as(log_ratio)
        ratio = log_ratio.exp()
        adv = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(ratio)
        low_hit = (adv < 0) & (ratio < 1 - low) & valid
        high_hit = (adv > 0) & (ratio > 1 + high) & valid
        return {
            "clip_low": low_hit.sum().float(),
            "clip_high": high_hit.sum().float(),
            "clip_pass": (valid & ~low_hit & ~high_hit).sum().float(),
        }
    return {}
