"""The global-batch ramp: JoyAI's stage-1 numbers, and a real trainer following the schedule."""

from __future__ import annotations

import json
from pathlib import Path

from joyai_megatron.config.recipe import load_recipe
from joyai_megatron.optim.batch_ramp import batch_size_at, batch_sizes, ramp_thresholds
from joyai_megatron.stages.pretrain import PretrainStage
from joyai_megatron.training.trainer import Trainer
from tests.foundation.foundation_helpers import load_tiny
from tests.joyai_helpers import REPO


def test_48b_stage1_ramp_3200_to_9216_in_47_steps_over_100b_tokens() -> None:
    r = load_recipe(REPO / "recipes" / "pretrain" / "joyai_48b_a3b" / "stage1.yaml")
    t = r.train
    thresholds = ramp_thresholds(t.rampup_batch_size, t.global_batch_size)
    batches = [b for _, b in thresholds]
    assert batches == [3200 + 128 * k for k in range(48)]  # 47 increments of 128
    assert batches[0] * t.seq_length == 13_107_200 and batches[-1] * t.seq_length == 37_748_736
    tokens = [x for x, _ in thresholds]
    assert tokens[0] == 0 and tokens[-1] == 100_000_000_000
    assert all(
        b - a == 100_000_000_000 // 47 or b - a == 100_000_000_000 // 47 + 1
        for a, b in zip(tokens, tokens[1:], strict=False)
    )
    # Walk the steps: the batch becomes 9216 at the first step that starts past 100B tokens.
    consumed, seen, previous = 0, [], 0
    while True:
        size = batch_size_at(consumed, thresholds, t.seq_length)
        if not seen or seen[-1] != size:
            seen.append(size)
        if size == 9216:
            break
        previous, consumed = consumed, consumed + size
    assert seen == batches
    ramp_samples = 100_000_000_000 // t.seq_length
    assert previous < ramp_samples <= consumed


class RecordingStage(PretrainStage):
    """Pretraining, recording what the trainer asks of the stage at every step."""

    calls: list[tuple[int, int]] = []

    def microbatches(self, split: str, start: int, num_microbatches: int):
        if split == "train":
            RecordingStage.calls.append((start, num_microbatches))
        return super().microbatches(split, start, num_microbatches)


def test_trainer_follows_the_ramp(single_process: None, tmp_path: Path) -> None:
    # 2 -> 8 sequences in increments of 2 over 1,024 tokens (sequence 64, micro-batch 2).
    ramp = [2, 2, 1024]
    recipe = load_tiny(
        tmp_path,
        "train.seq_length=64",
        f"train.rampup_batch_size=[{','.join(map(str, ramp))}]",
        "train.train_iters=6",
        "logging.interval=1",
        "checkpoint.save_interval=0",
    )
    RecordingStage.calls = []
    result = Trainer(recipe, RecordingStage).train()
    expected = batch_sizes(6, ramp_thresholds(ramp, 8), 64)
    assert expected == [2, 2, 2, 4, 6, 8]  # thresholds at 0, 5, 10, 16 samples
    history = [int(h["global_batch_size"]) for h in result["history"]]
    assert history == expected
    logged = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [int(x["global_batch_size"]) for x in logged if "global_batch_size" in x] == expected
    mbs = recipe.train.micro_batch_size
    starts = [sum(expected[:i]) for i in range(len(expected))]
    assert RecordingStage.calls == [(s, b // mbs) for s, b in zip(starts, expected, strict=True)]
    assert result["history"][-1]["consumed_tokens"] == sum(expected) * 64
