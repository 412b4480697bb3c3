"""GRPO, GSPO and the KL term against independent re-computations of their published formulas."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from joyai_megatron.rl import fiberpo_domain_loss, fiberpo_loss, grpo_loss, gspo_loss
from joyai_megatron.rl.kl import kl_estimate


def _batch(seed: int, scale: float, batch: int = 6, length: int = 9):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 2
    new = old + scale * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    mask = torch.ones(batch, length, dtype=torch.bool)
    for b in range(batch):
        mask[b, length - 2 * (b % 3) :] = False
    adv = torch.randn(batch, generator=gen, dtype=torch.float64)
    return new, old, adv, mask


def _value_and_grad(fn, logprobs, *args, **kwargs):
    leaf = logprobs.detach().clone().requires_grad_(True)
    out = fn(leaf, *args, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


def grpo_reference(logprobs, old, adv, mask, eps_low, eps_high, dual_clip=None):
    """DeepSeekMath's GRPO objective (without KL), one token at a time:
    J = (1/G) sum_i (1/|o_i|) sum_t min(r A, clip(r, 1-eps_low, 1+eps_high) A),
    and for A < 0 the dual clip max(., c A) of Ye et al. (2020)."""
    per_seq = []
    for i in range(logprobs.shape[0]):
        terms = []
        for t in range(logprobs.shape[1]):
            if not mask[i, t]:
                continue
            a = adv[i] if adv.dim() == 1 else adv[i, t]
            r = torch.exp(logprobs[i, t] - old[i, t])
            term = torch.min(r * a, torch.clamp(r, 1 - eps_low, 1 + eps_high) * a)
            if dual_clip is not None and a < 0:
                term = torch.max(term, dual_clip * a)
            terms.append(term)
        per_seq.append(torch.stack(terms).mean())
    return -torch.stack(per_seq).mean()


def gspo_reference(logprobs, old, adv, mask, eps_low, eps_high):
    """The GSPO paper's objective: s_i = (pi(y_i|x) / pi_old(y_i|x))^(1/|y_i|),
    J = (1/G) sum_i min(s_i A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i)."""
    terms = []
    for i in range(logprobs.shape[0]):
        seq_log_ratio = (logprobs[i][mask[i]] - old[i][mask[i]]).sum()
        s = torch.exp(seq_log_ratio / mask[i].sum())
        terms.append(torch.min(s * adv[i], torch.clamp(s, 1 - eps_low, 1 + eps_high) * adv[i]))
    return -torch.stack(terms).mean()


@pytest.mark.parametrize("token_level", [False, True])
@pytest.mark.parametrize(("eps_low", "eps_high", "dual_clip"), [(0.2, 0.2, None), (0.2, 0.28, 3.0)])
def test_grpo_matches_published_formula(token_level, eps_low, eps_high, dual_clip):
    new, old, adv, mask = _batch(0, scale=0.4)  # large enough that every clip branch is hit
    if token_level:
        adv = torch.randn(mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    kwargs = dict(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip)
    loss, grad = _value_and_grad(grpo_loss, new, old, adv, mask, **kwargs)
    ref_loss, ref_grad = _value_and_grad(grpo_reference, new, old, adv, mask, eps_low, eps_high, dual_clip)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    _, metrics = grpo_loss(new, old, adv, mask, **kwargs)
    assert metrics["clip_low_frac"] > 0 and metrics["clip_high_frac"] > 0
    if dual_clip is not None:
        assert "dual_clip_frac" in metrics


def test_grpo_dual_clip_caps_negative_advantage_tokens():
    old = torch.zeros(1, 2, dtype=torch.float64)
    new = torch.tensor([[math.log(5.0), math.log(1.1)]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    adv = torch.tensor([-1.0], dtype=torch.float64)
    loss, grad = _value_and_grad(grpo_loss, new, old, adv, mask, dual_clip=3.0)
    # token 0: min(-5, -1.2) = -5, capped at 3 * -1 = -3 (no gradient); token 1 unclipped: -1.1
    assert loss.item() == pytest.approx(-(-3.0 - 1.1) / 2)
    assert grad[0, 0] == 0 and grad[0, 1] == pytest.approx(1.1 / 2)
    _, metrics = grpo_loss(new, old, adv, mask, dual_clip=3.0)
    assert metrics["dual_clip_frac"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("scale", [1e-4, 3e-3])
def test_gspo_matches_published_formula(scale):
    new, old, adv, mask = _batch(2, scale=scale)
    loss, grad = _value_and_grad(gspo_loss, new, old, adv, mask)
    ref_loss, ref_grad = _value_and_grad(gspo_reference, new, old, adv, mask, 3e-4, 4e-4)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    _, metrics = gspo_loss(new, old, adv, mask)
    seq_ratios = torch.stack([(new[i][mask[i]] - old[i][mask[i]]).mean().exp() for i in range(6)])
    assert metrics["seq_ratio_max"].item() == pytest.approx(seq_ratios.max().item())
    if scale > 1e-3:
        assert metrics["clip_low_frac"] + metrics["clip_high_frac"] > 0


def test_gspo_token_with_constant_advantage_equals_gspo():
    new, old, adv, mask = _batch(3, scale=3e-3)
    per_token = adv[:, None].expand(mask.shape).clone()
    seq_loss, seq_grad = _value_and_grad(gspo_loss, new, old, adv, mask)
    tok_loss, tok_grad = _value_and_grad(gspo_loss, new, old, per_token, mask)
    torch.testing.assert_close(seq_loss, tok_loss)
    torch.testing.assert_close(seq_grad, tok_grad)


def test_kl_estimators_match_their_definitions():
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    ref = torch.tensor([-1.5, -1.0, -0.5], dtype=torch.float64)
    x = ref - logp
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), logp - ref)
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), torch.exp(x) - x - 1)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError, match="unknown KL"):
        kl_estimate(logp, ref, "k2")


@pytest.mark.parametrize("loss_fn", [fiberpo_loss, grpo_loss, gspo_loss])
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_term_is_added_with_its_coefficient(loss_fn, estimator):
    new, old, adv, mask = _batch(4, scale=0.01)
    ref = old + 0.05 * torch.randn(old.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    base_loss, base_grad = _value_and_grad(loss_fn, new, old, adv, mask)
    kl_loss, kl_grad = _value_and_grad(
        loss_fn, new, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, kl_estimator=estimator
    )

    def kl_only(logprobs):
        per_seq = [kl_estimate(logprobs[i][mask[i]], ref[i][mask[i]], estimator).mean() for i in range(6)]
        return 0.1 * torch.stack(per_seq).mean()

    expected_loss, expected_grad = _value_and_grad(kl_only, new)
    torch.testing.assert_close(kl_loss - base_loss, expected_loss)
    torch.testing.assert_close(kl_grad - base_grad, expected_grad)
    _, metrics = loss_fn(new, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, kl_estimator=estimator)
    assert metrics["kl"].item() == pytest.approx(expected_loss.item() / 0.1)
    with pytest.raises(ValueError, match="ref_logprobs"):
        loss_fn(new, old, adv, mask, kl_coef=0.1)


def test_shape_errors_are_reported():
    new, old, adv, mask = _batch(6, scale=0.01)
    with pytest.raises(ValueError, match="share one shape"):
        grpo_loss(new, old[:, :-1], adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        gspo_loss(new, old, adv[:-1], mask)


@pytest.mark.parametrize("loss", [grpo_loss, gspo_loss, fiberpo_loss, "fiberpo_domain"])
def test_a_misspelt_loss_keyword_is_refused(loss) -> None:
    """Every loss takes the shared keywords as ``**terms`` (``PGTerms``): a typo such as
    ``kl_coeff`` must raise, not silently leave the KL penalty off."""
    logprobs = torch.zeros(2, 3)
    args = (logprobs, logprobs, torch.ones(2), torch.ones(2, 3, dtype=torch.bool))
    if loss == "fiberpo_domain":
        loss = partial(
            fiberpo_domain_loss, domain_ids=torch.zeros(2, dtype=torch.long), group_ids=torch.arange(2)
        )
    with pytest.raises(TypeError, match="kl_coeff"):
        loss(*args, kl_coeff=0.1)
    loss(*args, kl_coef=0.0)  # the known spelling
