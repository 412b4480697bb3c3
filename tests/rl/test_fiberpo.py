"""FiberPO (Eqs. 1-5): on-policy identity, block structure, every gate and clip branch, limits."""

from __future__ import annotations

import math

import pytest
import torch

from joyai_megatron.rl import fiberpo_loss, grpo_loss, gspo_loss
from joyai_megatron.rl.fiberpo import (
    ClipRegime,
    GateRegime,
    base_gate,
    channel_budgets,
    fiberpo_log_weights,
)

HUGE = dict(delta=1e6, c_minus=1e5)  # budgets above any drift below: every base gate passes


def _batch(seed: int, batch: int = 5, length: int = 7, scale: float = 0.05):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 3
    new = old + scale * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    mask = torch.ones(batch, length, dtype=torch.bool)
    for b in range(batch):
        mask[b, length - b % 3 :] = False  # ragged lengths
    adv = torch.randn(batch, generator=gen, dtype=torch.float64)
    return new.requires_grad_(True), old, adv, mask


def _grad(loss_fn, logprobs, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor, dict]:
    leaf = logprobs.detach().clone().requires_grad_(True)
    loss, metrics = loss_fn(leaf, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad, metrics


def _policy_gradient_loss(logprobs, adv, mask):
    """-sum_seq (1/B)(1/T) sum_t A_t log pi_t: the REINFORCE surrogate, written out per sequence."""
    total = logprobs.new_zeros(())
    seqs = [b for b in range(mask.shape[0]) if mask[b].any()]
    for b in seqs:
        a = adv[b] if adv.dim() == 1 else adv[b][mask[b]]
        total = total + (a * logprobs[b][mask[b]]).mean()
    return -total / len(seqs)


def _weights(log_ratio, mask, *, delta, c_minus, eps):
    c_plus, c_neg = channel_budgets(delta, c_minus)
    return fiberpo_log_weights(log_ratio, mask, c_plus=c_plus, c_minus=c_neg, eps=eps)


@pytest.mark.parametrize("token_level", [False, True])
def test_on_policy_weights_are_one_and_gradient_is_policy_gradient(token_level):
    logprobs, _, adv, mask = _batch(0)
    if token_level:
        adv = torch.randn(mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    old = logprobs.detach().clone()
    loss, grad, metrics = _grad(fiberpo_loss, logprobs, old, adv, mask)
    assert metrics["weight_mean"] == pytest.approx(1.0)
    assert metrics["gate_pos_pass_frac"] == 1.0 and metrics["gate_neg_pass_frac"] == 1.0
    assert metrics["fiber_clip_frac"] == 0.0
    weights = _weights(torch.zeros_like(old), mask, delta=7e-4, c_minus=3e-4, eps=1e-4)
    assert torch.equal(weights.log_weight, torch.zeros_like(old))

    ref_leaf = logprobs.detach().clone().requires_grad_(True)
    ref_loss = _policy_gradient_loss(ref_leaf, adv, mask)
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_leaf)
    expected_value = (
        -sum(  # J at r = 1 is the advantage's seq-mean-token-mean
            (adv[b] if adv.dim() == 1 else adv[b][mask[b]].mean()) for b in range(mask.shape[0])
        )
        / mask.shape[0]
    )
    assert loss.item() == pytest.approx(float(expected_value), abs=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


def test_unclipped_jacobian_is_identity_and_weight_is_ratio():
    """Pass-through everywhere: log G_i = rho_i, so d log G / d rho = I (any r, not only r = 1)."""
    _, _, _, mask = _batch(2)
    rho = 0.3 * torch.randn(mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    rho = torch.where(mask, rho, 0.0)

    def log_weight(x):
        return _weights(x, mask, **HUGE, eps=math.inf).log_weight

    torch.testing.assert_close(log_weight(rho), rho)
    jac = torch.autograd.functional.jacobian(log_weight, rho).reshape(rho.numel(), rho.numel())
    eye = torch.diag(mask.flatten().to(torch.float64))
    torch.testing.assert_close(jac, eye)


def test_residual_form_equals_definition_without_clipping():
    """Residual form unclipped = definition: log r_fiber(i) = log r_i - mean_t log r_t; the channel
    aggregates and base are recomputed here from their definitions."""
    _, _, _, mask = _batch(4)
    rho = 0.1 * torch.randn(mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    rho = torch.where(mask, rho, 0.0)
    weights = _weights(rho, mask, **HUGE, eps=math.inf)
    for b in range(mask.shape[0]):
        r = rho[b][mask[b]]
        torch.testing.assert_close(weights.fiber.log_fiber[b][mask[b]], r - r.mean())
        log_s_pos, log_s_neg = r.clamp(min=0).mean(), (-r).clamp(min=0).mean()
        torch.testing.assert_close(weights.log_s_pos[b], log_s_pos)
        torch.testing.assert_close(weights.log_base[b], log_s_pos - log_s_neg)


def test_gradients_do_not_cross_trajectories():
    logprobs, old, adv, mask = _batch(6, scale=0.02)
    kwargs = dict(delta=0.02, c_minus=0.008, eps=0.004)  # every regime occurs at this scale
    _, grad, metrics = _grad(fiberpo_loss, logprobs, old, adv, mask, **kwargs)
    assert 0 < metrics["fiber_clip_frac"] < 1
    perturbed = logprobs.detach().clone()
    perturbed[2] += 0.05 * torch.randn(perturbed.shape[1], dtype=torch.float64)
    _, grad_perturbed, _ = _grad(fiberpo_loss, perturbed, old, adv, mask, **kwargs)
    others = [b for b in range(mask.shape[0]) if b != 2]
    torch.testing.assert_close(grad_perturbed[others], grad[others], rtol=0, atol=0)
    assert not torch.allclose(grad_perturbed[2], grad[2])

    rho = torch.where(mask, logprobs.detach() - old, 0.0)
    jac = torch.autograd.functional.jacobian(lambda x: _weights(x, mask, **kwargs).log_weight, rho)
    for b in range(mask.shape[0]):
        for c in range(mask.shape[0]):
            if b != c:
                assert torch.count_nonzero(jac[b, :, c, :]) == 0


def test_base_gate_branches_value_gradient_and_continuity():
    budget, n = 0.1, torch.tensor([4.0], dtype=torch.float64)
    band_end = (1 + 1 / 4) * budget
    cases = [  # x, regime, value, slope
        (0.06, GateRegime.PASS, 0.06, 1.0),
        (-0.06, GateRegime.PASS, -0.06, 1.0),
        (0.11, GateRegime.ROLLBACK, 5 * 0.1 - 4 * 0.11, -4.0),
        (-0.11, GateRegime.ROLLBACK, -(5 * 0.1) + 4 * 0.11, -4.0),
        (0.2, GateRegime.GATED, 0.0, 0.0),
        (-0.2, GateRegime.GATED, 0.0, 0.0),
    ]
    for x0, regime, value, slope in cases:
        x = torch.tensor([x0], dtype=torch.float64, requires_grad=True)
        out, reg = base_gate(x, budget, n)
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert reg.item() == regime
        assert out.item() == pytest.approx(value)
        assert grad.item() == pytest.approx(slope)
        assert torch.autograd.gradcheck(lambda y: base_gate(y, budget, n)[0], (x.detach().requires_grad_(),))
    for edge, expected in [(budget, budget), (band_end, 0.0)]:
        for side in (-1e-12, 1e-12):
            out, _ = base_gate(torch.tensor([edge + side], dtype=torch.float64), budget, n)
            assert out.item() == pytest.approx(expected, abs=1e-10)


def _single(rho: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.tensor([rho], dtype=torch.float64)
    return x, torch.ones_like(x, dtype=torch.bool)


@pytest.mark.parametrize("channel", ["pos", "neg"])
@pytest.mark.parametrize(
    ("mean_drift", "regime", "base_slope"),
    [(0.05, GateRegime.PASS, None), (0.115, GateRegime.ROLLBACK, -1.0), (0.3, GateRegime.GATED, 0.0)],
)
def test_trajectory_gate_branches_in_the_full_objective(channel, mean_drift, regime, base_slope):
    """One-signed trajectory of T = 4 with C = 0.1 in the drifting channel; eps = inf isolates the base.

    d log G_i / d rho_j = delta_ij in pass-through; otherwise base_slope + delta_ij - 1/T (the
    unclipped residual rho_i - mean rho keeps its own -1/T), with base_slope = -1 in rollback
    (slope -T times d log s / d rho_j = +-1/T) and 0 when gated.
    """
    sign = 1.0 if channel == "pos" else -1.0
    offsets = [0.004, -0.003, 0.001, -0.002]
    rho, mask = _single([sign * (mean_drift + o) for o in offsets])
    budget = 0.1  # the drifting channel's budget; the other channel stays at 0 and passes
    kwargs = dict(delta=0.15, c_minus=0.05) if channel == "pos" else dict(delta=0.3, c_minus=budget)
    weights = _weights(rho, mask, **kwargs, eps=math.inf)
    gate = weights.gate_pos if channel == "pos" else weights.gate_neg
    assert gate.item() == regime

    jac = torch.autograd.functional.jacobian(
        lambda x: _weights(x, mask, **kwargs, eps=math.inf).log_weight, rho
    )
    jac = jac.reshape(4, 4)
    eye = torch.eye(4, dtype=torch.float64)
    expected = eye if base_slope is None else base_slope + eye - 0.25
    torch.testing.assert_close(jac, expected)
    assert torch.autograd.gradcheck(
        lambda x: _weights(x, mask, **kwargs, eps=math.inf).log_weight, (rho.clone().requires_grad_(),)
    )

    s = abs(mean_drift)
    gate_value = {GateRegime.PASS: s, GateRegime.ROLLBACK: 5 * budget - 4 * s, GateRegime.GATED: 0.0}[regime]
    log_base = gate_value if channel == "pos" else -gate_value
    torch.testing.assert_close(weights.log_base, torch.tensor([log_base], dtype=torch.float64))


def test_local_clipping_regimes_value_and_gradient():
    """Tokens built to hit u clipped high, u clipped low (two of them) and v clipped; base passes.

    Positive channel: log s+ = 0.0512 / 4 = 0.0128, so the u term (rho_i - log s+) of 0.05 exceeds
    eps and those of 0.001 and 2e-4 fall below -eps; the negative token's v term (+log s+) exceeds
    eps. Every other term stays inside, so each clipped term contributes value +-eps and no gradient.
    """
    eps, n = 0.01, 4
    rho, mask = _single([0.05, 0.001, -0.002, 2e-4])
    log_s_neg = 0.002 / n

    def fiber(x):
        return _weights(x, mask, **HUGE, eps=eps).fiber.log_fiber

    out = _weights(rho, mask, **HUGE, eps=eps).fiber
    assert out.u_regime.tolist() == [[ClipRegime.HIGH, ClipRegime.LOW, ClipRegime.INSIDE, ClipRegime.LOW]]
    assert out.v_regime.tolist() == [
        [ClipRegime.INSIDE, ClipRegime.INSIDE, ClipRegime.HIGH, ClipRegime.INSIDE]
    ]
    expected = [eps + log_s_neg, -eps + log_s_neg, (-0.002 + log_s_neg) - eps, -eps + log_s_neg]
    torch.testing.assert_close(out.log_fiber, torch.tensor([expected], dtype=torch.float64))

    jac = torch.autograd.functional.jacobian(fiber, rho).reshape(4, 4)
    d_log_s_neg = torch.tensor([0.0, 0.0, -1 / n, 0.0], dtype=torch.float64)
    expected_jac = torch.stack(
        [
            d_log_s_neg,  # u clipped: only +clip(ls-) remains, moving with rho_2 alone
            d_log_s_neg,
            torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64) + d_log_s_neg,  # v clipped
            d_log_s_neg,
        ]
    )
    torch.testing.assert_close(jac, expected_jac)
    assert torch.autograd.gradcheck(fiber, (rho.clone().requires_grad_(),))


def test_regime_metrics_count_sequences_and_tokens():
    rho = torch.tensor(
        [[0.05, 0.05, 0.05, 0.05], [0.115, 0.115, 0.115, 0.115], [0.3, 0.3, 0.3, 0.0]], dtype=torch.float64
    )
    mask = torch.ones_like(rho, dtype=torch.bool)
    mask[2, 3] = False
    old = torch.zeros_like(rho)
    _, metrics = fiberpo_loss(
        old + rho, old, torch.ones(3, dtype=torch.float64), mask, delta=0.15, c_minus=0.05, eps=1.0
    )
    assert metrics["gate_pos_pass_frac"].item() == pytest.approx(1 / 3)
    assert metrics["gate_pos_rollback_frac"].item() == pytest.approx(1 / 3)
    assert metrics["gate_pos_gated_frac"].item() == pytest.approx(1 / 3)
    assert metrics["gate_neg_pass_frac"].item() == 1.0
    assert metrics["fiber_clip_frac"].item() == 0.0
    assert metrics["ratio_max"].item() == pytest.approx(math.exp(0.3))
    assert metrics["ratio_min"].item() == pytest.approx(math.exp(0.05))


def test_limit_eps_and_delta_to_infinity_is_unclipped_grpo():
    """eps -> inf and C+, C- -> inf: G_i = r_i, the token-ratio surrogate (GRPO with no clip)."""
    logprobs, old, adv, mask = _batch(7, scale=0.3)
    loss_f, grad_f, _ = _grad(fiberpo_loss, logprobs, old, adv, mask, **HUGE, eps=math.inf)
    loss_g, grad_g, _ = _grad(grpo_loss, logprobs, old, adv, mask, eps_low=math.inf, eps_high=math.inf)
    torch.testing.assert_close(loss_f, loss_g)
    torch.testing.assert_close(grad_f, grad_g)
    # and GRPO with its usual clip agrees wherever no token ratio leaves [0.8, 1.2]
    small, old_s, adv_s, mask_s = _batch(8, scale=0.05)
    assert (torch.where(mask_s, small.detach() - old_s, 0.0).abs() < math.log(1.2)).all()
    loss_f, grad_f, _ = _grad(fiberpo_loss, small, old_s, adv_s, mask_s, **HUGE, eps=math.inf)
    loss_g, grad_g, _ = _grad(grpo_loss, small, old_s, adv_s, mask_s)
    torch.testing.assert_close(loss_f, loss_g)
    torch.testing.assert_close(grad_f, grad_g)


def test_limit_eps_to_zero_and_delta_to_infinity_is_unclipped_gspo():
    """eps = 0 removes the residual (r_fiber = 1), C+- -> inf passes the base: G_i = s = exp(mean rho)."""
    logprobs, old, adv, mask = _batch(9, scale=0.3)
    loss_f, grad_f, _ = _grad(fiberpo_loss, logprobs, old, adv, mask, **HUGE, eps=0.0)
    loss_s, grad_s, _ = _grad(gspo_loss, logprobs, old, adv, mask, eps_low=math.inf, eps_high=math.inf)
    torch.testing.assert_close(loss_f, loss_s)
    torch.testing.assert_close(grad_f, grad_s)
    # and GSPO with its default clip agrees wherever every sequence ratio stays inside it
    tiny, old_t, adv_t, mask_t = _batch(10, scale=1e-4)
    loss_f, grad_f, _ = _grad(fiberpo_loss, tiny, old_t, adv_t, mask_t, **HUGE, eps=0.0)
    loss_s, grad_s, metrics = _grad(gspo_loss, tiny, old_t, adv_t, mask_t)
    assert metrics["clip_low_frac"] == 0 and metrics["clip_high_frac"] == 0
    torch.testing.assert_close(loss_f, loss_s)
    torch.testing.assert_close(grad_f, grad_s)


def test_budgets_are_validated():
    with pytest.raises(ValueError, match="C- < C"):
        fiberpo_loss(*_batch(0)[:2], torch.zeros(5), _batch(0)[3], delta=6e-4, c_minus=3e-4)
    with pytest.raises(ValueError, match="eps"):
        fiberpo_loss(*_batch(0)[:2], torch.zeros(5), _batch(0)[3], eps=-1.0)
    assert channel_budgets(7e-4, 3e-4) == pytest.approx((4e-4, 3e-4))
    assert channel_budgets(math.inf, 3e-4) == (math.inf, 3e-4)


def test_padding_garbage_does_not_leak_and_num_sequences_rescales():
    logprobs, old, adv, mask = _batch(11)
    dirty = logprobs.detach().clone()
    dirty[~mask] = float("nan")
    old_dirty = old.clone()
    old_dirty[~mask] = -float("inf")
    loss, grad, _ = _grad(fiberpo_loss, dirty, old_dirty, adv, mask)
    clean_loss, clean_grad, _ = _grad(fiberpo_loss, logprobs, old, adv, mask)
    torch.testing.assert_close(loss, clean_loss)
    torch.testing.assert_close(grad, torch.where(mask, clean_grad, 0.0))
    assert torch.isfinite(grad).all()
    scaled, _ = fiberpo_loss(logprobs, old, adv, mask, num_sequences=20)
    torch.testing.assert_close(scaled, clean_loss * 5 / 20)


def test_bf16_inputs_are_computed_in_fp32():
    logprobs, old, adv, mask = _batch(12, scale=1e-3)
    loss, metrics = fiberpo_loss(logprobs.detach().bfloat16().requires_grad_(), old.bfloat16(), adv, mask)
    assert loss.dtype == torch.float32
    assert metrics["ratio_mean"].dtype == torch.float32


def test_token_weight_stays_within_two_eps_of_the_trajectory_weight():
    """|log G_i - log w_base| <= 2 eps whatever the drift: the residual cannot outvote the base."""
    _, _, _, mask = _batch(13)
    rho = torch.where(mask, torch.randn(mask.shape, dtype=torch.float64), 0.0)  # |rho| ~ 1: far off-policy
    for eps in (1e-4, 0.05):
        weights = _weights(rho, mask, delta=7e-4, c_minus=3e-4, eps=eps)
        deviation = (weights.log_weight - weights.log_base[:, None])[mask].abs()
        assert deviation.max() <= 2 * eps + 1e-15
