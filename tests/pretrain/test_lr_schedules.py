"""The learning-rate schedule of every pretraining stage recipe, through the real
``OptimizerParamScheduler`` that ``optim/schedule.build_scheduler`` builds.

The trainer steps the scheduler by the global batch (in samples), so the LR after T tokens is the
LR after ceil(T / seq_length) samples.  The expected values are the report's (spec section 2).
"""

from __future__ import annotations

import math

import pytest
import torch

from joyai_megatron.config.recipe import load_recipe
from joyai_megatron.optim.batch_ramp import batch_sizes, ramp_thresholds
from joyai_megatron.optim.schedule import build_scheduler
from tests.joyai_helpers import REPO

PRETRAIN = REPO / "recipes" / "pretrain"
B = 1_000_000_000


class StandIn:
    """What OptimizerParamScheduler touches: ``param_groups`` (it writes lr and weight_decay)."""

    def __init__(self) -> None:
        self.inner = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups


def _train_samples(recipe) -> int:
    """The run's length in samples, computed here the way the recipe states it."""
    t = recipe.train
    if t.train_tokens is not None:
        return math.ceil(t.train_tokens / t.seq_length)
    return sum(
        batch_sizes(t.train_iters, ramp_thresholds(t.rampup_batch_size, t.global_batch_size), t.seq_length)
    )


def lr_after(recipe_path: str, tokens: list[float]) -> list[float]:
    """LR the optimizer holds after ``tokens`` tokens of the recipe's run (fresh counters)."""
    recipe = load_recipe(PRETRAIN / recipe_path)
    optimizer = StandIn()
    scheduler = build_scheduler(
        optimizer,
        recipe.optim,
        recipe.scheduler,
        seq_length=recipe.train.seq_length,
        train_samples=_train_samples(recipe),
    )
    values, done = [], 0
    for x in tokens:
        target = math.ceil(x / recipe.train.seq_length)
        scheduler.step(increment=target - done)
        done = target
        values.append(optimizer.param_groups[0]["lr"])
    return values


def cosine(start: float, end: float, fraction: float) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * fraction))


def test_stage1_warmup_then_stable() -> None:
    got = lr_after("joyai_48b_a3b/stage1.yaml", [0, 25 * B, 50 * B, 100 * B, 101 * B, 1000 * B, 14000 * B])
    assert got[0] == 0.0
    assert got[1] == pytest.approx(1.05e-4, rel=1e-6)
    assert got[2] == pytest.approx(2.1e-4, rel=1e-6)
    assert got[3:] == pytest.approx([4.2e-4] * 4, rel=1e-9)


@pytest.mark.parametrize(
    ("recipe", "start", "end", "length"),
    [
        ("joyai_48b_a3b/stage2.yaml", 4.2e-4, 1.4e-4, 4000 * B),
        ("joyai_48b_a3b/stage3.yaml", 1.4e-4, 4.2e-5, 2000 * B),
        ("joyai_48b_a3b/stage4_64k.yaml", 4.2e-5, 3.2e-5, 100 * B),
        ("joyai_48b_a3b/stage4_128k.yaml", 3.2e-5, 2.0e-5, 50 * B),
    ],
)
def test_48b_cosine_stages(recipe: str, start: float, end: float, length: int) -> None:
    points = [0, length / 4, length / 2, length, length * 1.01]
    got = lr_after(recipe, points)
    assert got[0] == pytest.approx(start, rel=1e-9)
    assert got[1] == pytest.approx(cosine(start, end, 0.25), rel=1e-6)
    assert got[2] == pytest.approx((start + end) / 2, rel=1e-6)  # the cosine midpoint
    assert got[3] == pytest.approx(end, rel=1e-9)
    assert got[4] == pytest.approx(end, rel=1e-9)  # past the end: min_lr


def test_48b_stages_chain() -> None:
    """Each stage starts where the previous one ended."""
    chain = ["stage1", "stage2", "stage3", "stage4_64k", "stage4_128k"]
    lengths = {
        "stage1": 14000 * B,
        "stage2": 4000 * B,
        "stage3": 2000 * B,
        "stage4_64k": 100 * B,
        "stage4_128k": 50 * B,
    }
    ends = {s: lr_after(f"joyai_48b_a3b/{s}.yaml", [0, lengths[s]]) for s in chain}
    for prev, nxt in zip(chain, chain[1:], strict=False):
        assert ends[nxt][0] == pytest.approx(ends[prev][1], rel=1e-9), (prev, nxt)


TINY_TOKENS = 8 * 128  # tokens per step at the tiny recipes' full batch


def test_tiny_stage1_warmup_then_constant() -> None:
    got = lr_after("tiny_cpu/stage1.yaml", [0, 10240, 20480, 40960, 250 * TINY_TOKENS])
    assert got == pytest.approx([0.0, 5e-3, 1e-2, 1e-2, 1e-2], rel=1e-9)


@pytest.mark.parametrize(
    ("recipe", "start", "end", "steps", "tokens_per_step"),
    [
        ("tiny_cpu/stage2.yaml", 1e-2, 3.3e-3, 40, TINY_TOKENS),
        ("tiny_cpu/stage3.yaml", 3.3e-3, 1e-3, 100, TINY_TOKENS),
        ("tiny_cpu/stage4.yaml", 1e-3, 6e-4, 20, 4 * 512),
    ],
)
def test_tiny_cosine_stages(recipe: str, start: float, end: float, steps: int, tokens_per_step: int) -> None:
    length = steps * tokens_per_step
    got = lr_after(recipe, [0, length / 2, length])
    assert got == pytest.approx([start, (start + end) / 2, end], rel=1e-6)
