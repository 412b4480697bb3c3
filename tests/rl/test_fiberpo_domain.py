"""FiberPO-Domain: reduction to FiberPO, on-policy identity, level gates, domain isolation."""

from __future__ import annotations

import math

import pytest
import torch

from joyai_megatron.rl import fiberpo_domain_loss, fiberpo_loss
from joyai_megatron.rl.fiberpo import GateRegime, channel_budgets
from joyai_megatron.rl.fiberpo_domain import fiberpo_domain_log_weights

LENGTH = 7


def _mixed_batch():
    """Rows chosen to put the trajectory gate (C+ = 0.1, C- = 0.05, T = 7) in every branch."""
    gen = torch.Generator().manual_seed(0)
    rows = [
        0.05 * torch.randn(LENGTH, generator=gen, dtype=torch.float64),  # both channels pass
        torch.full((LENGTH,), 0.107, dtype=torch.float64),  # + rollback: (0.1, 0.1143)
        torch.full((LENGTH,), 0.3, dtype=torch.float64),  # + gated
        torch.full((LENGTH,), -0.052, dtype=torch.float64),  # - rollback: (0.05, 0.0571)
        -0.2 + 0.01 * torch.randn(LENGTH, generator=gen, dtype=torch.float64),  # - gated
        0.02 * torch.randn(LENGTH, generator=gen, dtype=torch.float64),
    ]
    rho = torch.stack(rows)
    old = -torch.rand(rho.shape, generator=gen, dtype=torch.float64)
    mask = torch.ones(rho.shape, dtype=torch.bool)
    mask[5, 4:] = False
    adv = torch.randn(rho.shape[0], generator=gen, dtype=torch.float64)
    return old + rho, old, adv, mask


def _value_and_grad(fn, logprobs, *args, **kwargs):
    leaf = logprobs.detach().clone().requires_grad_(True)
    loss, metrics = fn(leaf, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad, metrics


def _budgets(**levels: tuple[float, float]) -> dict[str, tuple[float, float]]:
    return {name: channel_budgets(*pair) for name, pair in levels.items()}


def test_one_domain_and_group_per_trajectory_reduces_to_fiberpo():
    new, old, adv, mask = _mixed_batch()
    ids = torch.arange(new.shape[0])
    loss, grad, metrics = _value_and_grad(
        fiberpo_domain_loss,
        new,
        old,
        adv,
        mask,
        ids,
        ids,
        domain_delta=0.15,
        domain_c_minus=0.05,
        group_delta=1e-3,  # residuals below the domain level vanish, so these budgets are moot
        group_c_minus=4e-4,
        delta=1e-3,
        c_minus=4e-4,
        eps=0.02,
    )
    ref_loss, ref_grad, ref_metrics = _value_and_grad(
        fiberpo_loss, new, old, adv, mask, delta=0.15, c_minus=0.05, eps=0.02
    )
    for regime in ("pass", "rollback", "gated"):
        for channel in ("pos", "neg"):
            key = f"{channel}_{regime}_frac"
            assert metrics[f"domain_{key}"] == ref_metrics[f"gate_{key}"]
        assert ref_metrics[f"gate_pos_{regime}_frac"] > 0  # every branch really is exercised
    assert metrics["traj_pos_pass_frac"] == 1.0 and metrics["group_neg_pass_frac"] == 1.0
    assert 0 < ref_metrics["fiber_clip_frac"] < 1
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


def test_on_policy_gradient_is_policy_gradient_with_real_groups():
    new, _, adv, mask = _mixed_batch()
    domains, groups = torch.tensor([0, 0, 0, 0, 1, 1]), torch.tensor([3, 3, 4, 4, 7, 7])
    adv = torch.randn(mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    old = new.detach().clone()
    _, grad, metrics = _value_and_grad(fiberpo_domain_loss, new, old, adv, mask, domains, groups)
    assert metrics["weight_mean"] == pytest.approx(1.0)
    expected = torch.zeros_like(new)
    for b in range(new.shape[0]):
        expected[b][mask[b]] = -adv[b][mask[b]] / mask[b].sum() / new.shape[0]
    torch.testing.assert_close(grad, expected)


def test_all_levels_passing_give_identity_jacobian():
    new, old, _, mask = _mixed_batch()
    rho = torch.where(mask, new - old, 0.0)
    domains, groups = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 0, 1, 2, 2, 3])
    huge = (1e6, 1e5)
    budgets = _budgets(domain=huge, group=huge, traj=huge)

    def log_weight(x):
        return fiberpo_domain_log_weights(x, mask, domains, groups, budgets=budgets, eps=math.inf).log_weight

    torch.testing.assert_close(log_weight(rho), rho)
    jac = torch.autograd.functional.jacobian(log_weight, rho).reshape(rho.numel(), rho.numel())
    torch.testing.assert_close(jac, torch.diag(mask.flatten().to(torch.float64)))


def test_level_gates_compose_on_telescoping_residuals():
    """One domain, two groups of two one-token trajectories, positive drift only, eps = inf.

    rho = [0.1, 0.3 | 0.5, 0.7]: A_D = 0.4, A_P = (0.2, 0.6), residuals P - D = (-0.2, +0.2),
    tau - P = (-0.1, 0.1, -0.1, 0.1). Budgets: domain C+ = 0.5 (passes 0.4), group C+ = 0.15 with
    n_P = 2 tokens (band 0.15..0.225: both groups roll back), trajectory C+ = 1 (passes).
    """
    rho = torch.tensor([[0.1], [0.3], [0.5], [0.7]], dtype=torch.float64)
    mask = torch.ones_like(rho, dtype=torch.bool)
    domains, groups = torch.zeros(4, dtype=torch.long), torch.tensor([0, 0, 1, 1])
    budgets = _budgets(domain=(0.55, 0.05), group=(0.2, 0.05), traj=(1.5, 0.5))
    out = fiberpo_domain_log_weights(rho, mask, domains, groups, budgets=budgets, eps=math.inf)
    rollback = 3 * 0.15 - 2 * 0.2  # sign(x) (n+1) C - n x at |x| = 0.2, n = 2
    group_term = torch.tensor([-rollback, -rollback, rollback, rollback], dtype=torch.float64)
    expected = 0.4 + group_term + torch.tensor([-0.1, 0.1, -0.1, 0.1], dtype=torch.float64)
    torch.testing.assert_close(out.log_base, expected)
    assert out.regimes["group_pos"].tolist() == [GateRegime.ROLLBACK] * 4
    assert out.regimes["domain_pos"].tolist() == [GateRegime.PASS] * 4
    assert out.regimes["traj_pos"].tolist() == [GateRegime.PASS] * 4
    # one-token trajectories: log G = log_base exactly (the residual rho - mean rho is 0)
    torch.testing.assert_close(out.log_weight[:, 0], expected)


def test_gradients_never_cross_domains_but_do_cross_inside_a_gated_domain():
    new, old, _, mask = _mixed_batch()
    rho = torch.where(mask, new - old, 0.0)
    domains, groups = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 0, 1, 2, 2, 3])
    budgets = _budgets(domain=(0.12, 0.05), group=(0.15, 0.05), traj=(0.15, 0.05))  # domain 0 gated

    def log_weight(x):
        return fiberpo_domain_log_weights(x, mask, domains, groups, budgets=budgets, eps=0.02).log_weight

    out = fiberpo_domain_log_weights(rho, mask, domains, groups, budgets=budgets, eps=0.02)
    assert out.regimes["domain_pos"][0] == GateRegime.GATED
    jac = torch.autograd.functional.jacobian(log_weight, rho)
    assert torch.count_nonzero(jac[:3, :, 3:, :]) == 0 and torch.count_nonzero(jac[3:, :, :3, :]) == 0
    assert torch.count_nonzero(jac[0, :, 1, :]) > 0  # same domain, non-passing gates: coupled


def test_groups_must_nest_in_domains_and_ids_must_be_per_sequence():
    new, old, adv, mask = _mixed_batch()
    with pytest.raises(ValueError, match="single domain"):
        fiberpo_domain_loss(
            new, old, adv, mask, torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 0, 0, 1, 2, 2])
        )
    with pytest.raises(ValueError, match="domain_ids"):
        fiberpo_domain_loss(new, old, adv, mask, torch.zeros(5, dtype=torch.long), torch.arange(6))
