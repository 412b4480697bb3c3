"""The tiny model through one real trainer step on CPU: finite losses, a gradient on every
trainable parameter, the aux-loss-free expert-bias update, and the Muon/AdamW parameter split."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from joyai_megatron.optim.builder import build_optimizer, parameter_split
from joyai_megatron.training.distributed import shutdown
from tests.foundation.foundation_helpers import tiny_trainer

# Every trainable parameter belongs to exactly one of these groups.
GROUPS = {
    "embedding": r"^embedding\.",
    "output_head": r"^output_layer\.",
    "final_norm": r"^decoder\.final_layernorm\.",
    "attention": r"^decoder\.layers\.\d+\.(input_layernorm|self_attention)\.",
    "dense_mlp": r"^decoder\.layers\.0\.(pre_mlp_layernorm|mlp\.linear_fc\d)\.",
    "moe_norm": r"^decoder\.layers\.[1-9]\d*\.pre_mlp_layernorm\.",
    "router": r"^decoder\.layers\.\d+\.mlp\.router\.",
    "experts": r"^decoder\.layers\.\d+\.mlp\.experts\.",
    "shared_expert": r"^decoder\.layers\.\d+\.mlp\.shared_experts\.",
    "mtp": r"^mtp\.layers\.0\.",
}


def _name(name: str) -> str:
    return name.removeprefix("module.")


@pytest.fixture(scope="module")
def stepped(tmp_path_factory: pytest.TempPathFactory):
    """A tiny trainer (MTP on, mock data, one rank) after exactly one optimizer step."""
    trainer = tiny_trainer(tmp_path_factory.mktemp("tiny"), "model.mtp_enabled=true", "train.train_iters=1")
    routers = trainer._routers()
    bias_before = [r.expert_bias.detach().clone() for r in routers]
    values = trainer.train_step()
    yield trainer, values, routers, bias_before
    shutdown()


def test_losses_are_finite(stepped) -> None:
    _, values, _, _ = stepped
    for key in ("lm_loss", "mtp_loss", "loss", "grad_norm"):
        assert math.isfinite(values[key]), (key, values)
    # A fresh model predicts ~uniformly over the 8192-token vocabulary.
    assert values["lm_loss"] == pytest.approx(math.log(8192), rel=0.1)
    assert values["loss"] == pytest.approx(values["lm_loss"] + 0.1 * values["mtp_loss"], rel=1e-6)


def test_every_trainable_parameter_has_a_gradient(stepped) -> None:
    trainer, _, _, _ = stepped
    seen = {group: 0 for group in GROUPS}
    for full_name, param in trainer.model[0].named_parameters():
        if not param.requires_grad:
            continue
        name = _name(full_name)
        groups = [g for g, pattern in GROUPS.items() if re.search(pattern, name)]
        assert len(groups) == 1, f"{name} matches groups {groups}"
        seen[groups[0]] += 1
        grad = getattr(param, "main_grad", None)
        grad = param.grad if grad is None else grad
        assert grad is not None, f"{name} has no gradient"
        assert torch.isfinite(grad).all(), f"{name} has a non-finite gradient"
        assert grad.abs().sum() > 0, f"{name} has an all-zero gradient"
    tiny = trainer.arch
    assert seen["experts"] == 2 * tiny.num_experts * (tiny.num_layers - 1)  # fc1 + fc2 per expert
    assert seen["router"] == tiny.num_layers - 1
    assert seen["shared_expert"] == 2 * (tiny.num_layers - 1)
    assert all(seen.values()), seen


def test_expert_bias_follows_the_load(stepped) -> None:
    """DeepSeek-V3's aux-loss-free rule: bias += rate * sign(mean load - load), per layer."""
    trainer, values, routers, before = stepped
    rate = trainer.recipe.model.moe_bias_update_rate
    assert len(routers) == len(trainer._expert_counts) == trainer.arch.num_layers - 1
    for router, old, counts in zip(routers, before, trainer._expert_counts, strict=True):
        counts = counts.double()
        tokens = trainer.recipe.train.global_batch_size * trainer.recipe.train.seq_length
        assert counts.sum() == tokens * trainer.arch.moe_router_topk
        expected = old.double() + rate * torch.sign(counts.mean() - counts)
        assert torch.allclose(router.expert_bias.double(), expected, atol=1e-7)
        assert not torch.equal(router.expert_bias, old), "expert bias did not move"
    assert values["moe/bias_max"] == pytest.approx(rate, rel=1e-5)


def _expected_split(model: torch.nn.Module) -> tuple[set[str], set[str]]:
    """Moonlight's rule: Muon for 2-D weights except embedding and output head; AdamW the rest."""
    muon, adam = set(), set()
    for name, p in model.named_parameters():
        embedding_or_head = _name(name).startswith(("embedding.", "output_layer."))
        (muon if p.ndim == 2 and not embedding_or_head else adam).add(name)
    return muon, adam


def test_muon_gets_the_hidden_matrices(stepped) -> None:
    trainer, _, _, _ = stepped
    split = parameter_split(trainer.optimizer, trainer.model)
    (muon_key,) = [k for k in split if "muon" in k.lower()]
    (adam_key,) = [k for k in split if "adam" in k.lower()]
    assert set(split) == {muon_key, adam_key}
    muon, adam = _expected_split(trainer.model[0])
    assert set(split[muon_key]) == muon
    assert set(split[adam_key]) == adam
    assert len(split[muon_key]) == len(muon) and len(split[adam_key]) == len(adam)  # no duplicates
    names = {_name(n) for n in split[muon_key]}
    for must in ("mlp.router.weight", "experts.local_experts.0.linear_fc1", "mtp.layers.0.eh_proj"):
        assert any(must in n for n in names), must
    adam_names = {_name(n) for n in split[adam_key]}
    assert {"embedding.word_embeddings.weight", "output_layer.weight"} <= adam_names
    assert any("layernorm" in n for n in adam_names)


def test_adam_recipe_puts_everything_in_adam(stepped) -> None:
    trainer, _, _, _ = stepped
    r = trainer.recipe
    optimizer = build_optimizer(
        dataclasses.replace(r.optim, optimizer="adam"), r.parallel, r.precision, trainer.model
    )
    split = parameter_split(optimizer, trainer.model)
    assert list(split) == ["AdamW"] or (len(split) == 1 and "adam" in next(iter(split)).lower()), split
    everything = {n for n, p in trainer.model[0].named_parameters() if p.requires_grad}
    assert set(next(iter(split.values()))) == everything
