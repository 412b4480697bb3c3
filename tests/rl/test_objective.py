"""``rl.loss`` selects a policy loss from one registry: a new objective is one registered function."""

from __future__ import annotations

import pytest
import torch

from joyai_megatron.config.schema import RLCfg
from joyai_megatron.rl import objective
from joyai_megatron.rl.baselines import grpo_loss
from joyai_megatron.rl.fiberpo import fiberpo_loss


def _inputs() -> objective.LossInputs:
    g = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(4, 6, generator=g)
    return objective.LossInputs(
        logprobs=logprobs,
        old_logprobs=logprobs + 0.05 * torch.randn(4, 6, generator=g),
        advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]),
        mask=torch.ones(4, 6, dtype=torch.bool),
        ref_logprobs=None,
        group_ids=torch.tensor([0, 0, 1, 1]),
        domain_ids=torch.tensor([0, 0, 0, 0]),
    )


def test_the_recipe_losses_are_registered_and_dispatch_to_their_functions() -> None:
    assert set(objective.LOSSES) == {"fiberpo", "fiberpo_domain", "grpo", "gspo"}
    x = _inputs()
    common = {"ref_logprobs": None, "kl_coef": 0.0, "kl_estimator": "k3", "num_sequences": 1.0}
    rl = RLCfg(loss="fiberpo")
    got, _ = objective.policy_loss(rl, x)
    want, _ = fiberpo_loss(x.logprobs, x.old_logprobs, x.advantages, x.mask, delta=rl.delta,
                           c_minus=rl.c_minus, eps=rl.eps, **common)  # fmt: skip
    assert torch.equal(got, want)
    rl = RLCfg(loss="grpo")
    got, _ = objective.policy_loss(rl, x)
    want, _ = grpo_loss(x.logprobs, x.old_logprobs, x.advantages, x.mask, dual_clip=rl.dual_clip, **common)
    assert torch.equal(got, want)


def test_a_registered_loss_is_selectable_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(objective, "LOSSES", dict(objective.LOSSES))
    with pytest.raises(ValueError, match="rl.loss must be one of"):
        objective.check_rl_config(RLCfg(loss="reinforce"))

    @objective.register_loss("reinforce")
    def _reinforce(rl, x, common):
        return -(x.logprobs * x.mask).sum(-1).mul(x.advantages).sum(), {}

    objective.check_rl_config(RLCfg(loss="reinforce"))
    loss, _ = objective.policy_loss(RLCfg(loss="reinforce"), _inputs())
    x = _inputs()
    assert torch.equal(loss, -(x.logprobs.sum(-1) * x.advantages).sum())
