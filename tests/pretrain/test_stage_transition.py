"""Stage transitions of the pretraining recipes: a stage that takes the previous stage's optimizer
state (``checkpoint.load_optimizer``) must build the same optimizer parameter groups, and starts on
its own LR schedule."""

from __future__ import annotations

from pathlib import Path

import megatron.core.optimizer as mcore_optimizer
import pytest
import torch

from joyai_megatron.config.recipe import load_recipe
from joyai_megatron.stages.pretrain import PretrainStage
from joyai_megatron.training.distributed import shutdown
from joyai_megatron.training.trainer import Trainer
from tests.foundation.foundation_helpers import MOCK_DATA
from tests.joyai_helpers import REPO

FAMILIES = ["joyai_48b_a3b", "tiny_cpu"]


def _group_key(recipe) -> tuple[float, float, float]:
    """What Megatron-Core matches optimizer parameter groups on when loading optimizer state
    (besides per-parameter flags): the LR bounds and the weight decay."""
    return recipe.optim.lr, recipe.optim.min_lr, recipe.optim.weight_decay


@pytest.mark.parametrize("family", FAMILIES)
def test_optimizer_state_is_only_carried_between_matching_groups(family: str) -> None:
    recipes = {
        p.name: load_recipe(p) for p in sorted((REPO / "recipes" / "pretrain" / family).glob("stage*.yaml"))
    }
    by_dir = {r.checkpoint.dir: r for r in recipes.values()}
    carried = 0
    for name, r in recipes.items():
        c = r.checkpoint
        if not c.load:
            continue
        assert c.load in by_dir, f"{family}/{name}: checkpoint.load {c.load} is no stage's checkpoint.dir"
        previous = by_dir[c.load]
        if c.load_optimizer:
            carried += 1
            assert _group_key(r) == _group_key(previous), (
                f"{family}/{name} loads the optimizer of {previous.name} but its (lr, min_lr, weight_decay) "
                f"{_group_key(r)} differ from {_group_key(previous)}: Megatron-Core cannot match the "
                "parameter groups; set checkpoint.load_optimizer=false or align the values"
            )
            assert not c.allow_missing, f"{family}/{name}: new parameters have no optimizer state to load"
    assert carried >= 1


class GroupStepAdam(torch.optim.Optimizer):
    """AdamW with Transformer Engine's ``FusedAdam`` contract (what Megatron-Core builds on GPUs):
    the step count lives in the param group, and ``load_state_dict`` takes only tensor state per
    parameter (TE looks each name up in its state-dtype table: anything else is a ``KeyError``)."""

    STATE = ("exp_avg", "exp_avg_sq", "master_param")

    def __init__(self, params, lr, weight_decay, betas, eps, capturable=False, adam_w_mode=True):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            (b1, b2), t = group["betas"], group["step"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                state["exp_avg"].lerp_(p.grad, 1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(group["eps"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - b1**t))

    def load_state_dict(self, state_dict):
        for saved in state_dict["state"].values():
            for name in saved:
                if name not in self.STATE:
                    raise KeyError(name)
        super().load_state_dict(state_dict)


@pytest.mark.parametrize("adam", ["torch", "fused"])
def test_stage2_takes_stage1_optimizer_state_and_its_own_lr(
    adam: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tiny stage 1 for two steps, then stage 2 from it: Muon and AdamW state arrive, the counters
    restart, and the first step's LR is stage 2's start (not stage 1's last).  ``fused``: the AdamW
    is one that counts steps per param group, as Transformer Engine's is on GPUs (stage 2 failed
    there with ``KeyError: 'step'`` while our load wrote torch's per-parameter step)."""
    if adam == "fused":
        monkeypatch.setattr(mcore_optimizer, "USING_PYTORCH_OPTIMIZER", False)
        monkeypatch.setattr(mcore_optimizer, "Adam", GroupStepAdam)
    common = [
        *MOCK_DATA,
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.seq_length=64",
        "checkpoint.save_interval=0",
    ]
    stage1 = load_recipe(
        REPO / "recipes/pretrain/tiny_cpu/stage1.yaml",
        [
            *common,
            "train.train_iters=2",
            "train.rampup_batch_size=null",
            f"checkpoint.dir={tmp_path / 's1'}",
            f"logging.dir={tmp_path / 'l1'}",
        ],
    )
    stage2 = load_recipe(
        REPO / "recipes/pretrain/tiny_cpu/stage2.yaml",
        [
            *common,
            "train.train_iters=1",
            f"checkpoint.dir={tmp_path / 's2'}",
            f"checkpoint.load={tmp_path / 's1'}",
            f"logging.dir={tmp_path / 'l2'}",
        ],
    )
    try:
        first = Trainer(stage1, PretrainStage)
        first.train()
        stage1_lr = first.optimizer.param_groups[0]["lr"]
        shutdown()
        second = Trainer(stage2, PretrainStage)
        assert second.resumed_from and second.state.iteration == 0 and second.state.consumed_samples == 0
        leaves = {type(getattr(o, "optimizer", o)).__name__: o for o in second.optimizer.chained_optimizers}
        for name, leaf in leaves.items():
            inner = getattr(leaf, "optimizer", leaf)
            assert inner.state and all(inner.state.values()), f"{name} state was not loaded"
        adam_leaf = leaves["GroupStepAdam" if adam == "fused" else "AdamW"].optimizer
        if adam == "fused":  # the step count (bias correction) came over in the param groups
            assert {g["step"] for g in adam_leaf.param_groups} == {2}
        else:
            assert {int(s["step"]) for s in adam_leaf.state.values()} == {2}
        lrs = {g["lr"] for g in second.optimizer.param_groups}
        assert lrs == {stage2.optim.lr}, (lrs, stage1_lr)
        assert stage1_lr != stage2.optim.lr  # the check above is not vacuous
    finally:
        shutdown()


def _main_param_gaps(trainer: Trainer, rounded: bool) -> list[float]:
    """max |fp32 main copy - model weight| for every BF16 parameter the optimizer keeps a copy of
    (``rounded``: the copy rounded to BF16 first, as the model weight is made from it)."""
    gaps = []
    for leaf in trainer.optimizer.chained_optimizers:
        for model_group, main_group in zip(leaf.float16_groups, leaf.fp32_from_float16_groups, strict=True):
            for weight, main in zip(model_group, main_group, strict=True):
                copy = main.to(weight.dtype).float() if rounded else main
                gaps.append(float((copy - weight.float()).abs().max()))
    return gaps


def test_weights_only_load_refreshes_the_optimizer_main_params(tmp_path: Path) -> None:
    """BF16 optimizers copy the weights into FP32 main parameters when they are built, before any
    checkpoint loads; a weights-only load (a new post-training stage, an HF import) must refresh those
    copies or the first step writes the fresh initialisation back into the model (seen on an H200:
    QAT loss 0.10 -> 3.4 in four steps).  Checked on the copies themselves (BF16 on CPU): after a
    weights-only load every main parameter equals its loaded weight, which differs from a fresh build."""
    common = [
        *MOCK_DATA,
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.seq_length=64",
        "checkpoint.save_interval=0",
        "precision.dtype=bf16",
    ]
    base = REPO / "recipes/pretrain/tiny_cpu/stage1.yaml"
    first = [
        *common,
        "train.train_iters=2",
        "train.rampup_batch_size=null",
        f"checkpoint.dir={tmp_path / 's1'}",
    ]
    try:
        Trainer(load_recipe(base, [*first, f"logging.dir={tmp_path / 'l1'}"]), PretrainStage).train()
        shutdown()
        fresh = Trainer(load_recipe(base, [*common, f"checkpoint.dir={tmp_path / 'fresh'}"]), PretrainStage)
        fresh_weights = [p.detach().float().clone() for p in fresh.model[0].parameters()]
        shutdown()
        for load_optimizer in ("false", "true"):
            run = [
                *common,
                f"checkpoint.dir={tmp_path / load_optimizer}",
                f"checkpoint.load={tmp_path / 's1'}",
            ]
            overrides = [
                *run,
                f"checkpoint.load_optimizer={load_optimizer}",
                f"logging.dir={tmp_path / 'l2'}",
            ]
            trainer = Trainer(load_recipe(base, overrides), PretrainStage)
            assert trainer.resumed_from
            loaded = [p.detach().float() for p in trainer.model[0].parameters()]
            assert max(float((a - b).abs().max()) for a, b in zip(loaded, fresh_weights, strict=True)) > 0
            # Weights only: the copies are the loaded weights.  With the optimizer: the checkpoint's
            # own FP32 copies, of which the BF16 weights are the rounding.
            gaps = _main_param_gaps(trainer, rounded=load_optimizer == "true")
            assert gaps and max(gaps) == 0.0, (load_optimizer, max(gaps))
            shutdown()
    finally:
        shutdown()
