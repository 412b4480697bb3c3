"""Log lines average the losses over their interval (Megatron's convention), the rest is the step's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from joyai_megatron.training.metrics import interval_means
from tests.foundation.foundation_helpers import load_tiny


def test_interval_means_average_only_the_losses() -> None:
    window = [
        {"loss": 4.0, "lm_loss": 3.0, "grad_norm": 9.0, "lr": 1.0},
        {"loss": 2.0, "lm_loss": 1.0, "mtp_loss": 5.0, "grad_norm": 7.0, "lr": 0.5},
    ]
    got = interval_means(window)
    assert got == {
        "loss": 3.0,
        "lm_loss": 2.0,
        "mtp_loss": 5.0,
        "grad_norm": 7.0,
        "lr": 0.5,
        "interval_steps": 2.0,
    }
    assert window[-1]["loss"] == 2.0  # the step's own record is left alone


@pytest.mark.usefixtures("single_process")
def test_logged_loss_is_the_mean_of_the_interval(tmp_path: Path) -> None:
    from joyai_megatron.stages.pretrain import PretrainStage
    from joyai_megatron.training.trainer import Trainer

    recipe = load_tiny(tmp_path, "train.train_iters=7", "logging.interval=3", "checkpoint.save_interval=0")
    history = Trainer(recipe, PretrainStage).train()["history"]
    rows = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    logged = {int(r["step"]): r for r in rows if "lm_loss" in r}
    assert sorted(logged) == [1, 3, 6, 7]  # step 1, every 3rd, the last
    per_step = [h["lm_loss"] for h in history]
    for step, first in ((1, 0), (3, 1), (6, 3), (7, 6)):
        expected = sum(per_step[first:step]) / (step - first)
        assert logged[step]["lm_loss"] == pytest.approx(expected, rel=1e-12), step
        assert logged[step]["interval_steps"] == step - first
        assert logged[step]["grad_norm"] == history[step - 1]["grad_norm"]
