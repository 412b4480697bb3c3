"""Time to a validation loss (``train_throughput.py --val-every``): the report's arithmetic on given
curves, and a CPU dry run on the demo corpus (ours and a baseline at its own learning rate, each
validated on the same held-out rows outside the clock)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.joyai_helpers import REPO, load_benchmark

bench = load_benchmark("train_throughput")


def _curve(losses: list[float], seconds_per_point: float) -> list[dict]:
    return [
        {"step": 10 * i, "tokens": 1000 * i, "seconds": seconds_per_point * i, "val_loss": loss}
        for i, loss in enumerate(losses, 1)
    ]


def test_target_is_the_highest_loss_every_part_reaches() -> None:
    results = [
        {"part": "ours-no-mtp", "curve": _curve([6.0, 4.0, 3.0], 2.0)},
        {"part": "baseline@0.001", "curve": _curve([6.5, 5.0, 4.2, 3.5], 1.0)},
        {"part": "baseline@0.003", "curve": _curve([6.2, 4.5, 3.9, 3.6], 1.5)},
    ]
    lines = bench.time_to_loss(results)
    assert lines[0].startswith("time to validation loss 3.6000")  # max over parts of each one's best
    # ours reaches 3.6 at its 3rd point (6 s); baseline@0.001 at its 4th (4 s), @0.003 at its 4th (6 s)
    # curves without a steady clock: both clocks give the same ratio
    assert lines[-2:] == [
        f"ratio time-to-loss ours-no-mtp/baseline@0.001 (best baseline, {clock}): seconds 1.50x, tokens 0.75x"
        for clock in ("steady clock", "wall clock")
    ]


def test_steady_clock_charges_the_first_step_at_the_mean_of_the_others() -> None:
    """10 steps in 30 s, the first 12 s of them (compilation): the others take 2 s each, so a point
    at 20 s of wall time is at 20 - 12 + 2 = 10 s on the steady clock."""
    curve = [{"step": 5, "tokens": 50, "seconds": 20.0, "val_loss": 5.0}]
    assert bench.steady_clock(curve, first_step=12.0, elapsed=30.0, steps=10)[0]["steady_seconds"] == 10.0
    assert bench.steady_clock(curve, first_step=12.0, elapsed=12.0, steps=1)[0]["steady_seconds"] == 20.0


def test_one_time_first_step_is_reported_apart() -> None:
    """Ours pays 20 s once on its first step and then trains faster: behind on the wall clock,
    ahead on the steady one, and each ratio picks its own best baseline."""
    ours = bench.steady_clock(_curve([6.0, 4.0, 3.0], 10.0), first_step=21.0, elapsed=30.0, steps=3)
    fast = bench.steady_clock(_curve([6.5, 5.0, 3.0], 5.0), first_step=5.0, elapsed=15.0, steps=3)
    slow = bench.steady_clock(_curve([6.5, 3.5, 3.0], 8.0), first_step=8.0, elapsed=24.0, steps=3)
    lines = bench.time_to_loss(
        [
            {"part": "ours-no-mtp", "curve": ours, "first_step_s": 21.0},
            {"part": "baseline@0.001", "curve": fast, "first_step_s": 5.0},
            {"part": "baseline@0.003", "curve": slow, "first_step_s": 8.0},
        ]
    )
    assert "first step 21.0 s" in lines[1]
    # target 3.0: ours at 30 s wall / 30 - 21 + 4.5 = 13.5 s steady; fast at 15 s; slow at 24 s
    assert lines[-2].endswith("(best baseline, steady clock): seconds 0.90x, tokens 1.00x")
    assert lines[-1].endswith("(best baseline, wall clock): seconds 2.00x, tokens 1.00x")


def test_part_names_carry_a_learning_rate() -> None:
    assert bench.part_and_lr("baseline@3e-4") == ("baseline", 3e-4)
    assert bench.part_and_lr("ours-no-mtp") == ("ours-no-mtp", None)
    with pytest.raises(SystemExit):
        bench.parse_args(["--parts", "nonsense@1e-3", "--dry-run"])
    with pytest.raises(SystemExit):  # validation needs real text
        bench.parse_args(["--dry-run", "--val-every", "2"])


@pytest.mark.slow
def test_dry_run_on_the_demo_corpus(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    data = tmp_path / "data"
    subprocess.run(
        [sys.executable, "-m", "data_prep", "demo", "--output", str(data)],
        cwd=REPO, env=env, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    cmd = [
        sys.executable, "benchmarks/train_throughput.py", "--dry-run", "--data", str(data),
        "--val-every", "1", "--val-rows", "4", "--parts", "ours-no-mtp,baseline@0.003",
        "--out-dir", str(tmp_path / "out"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (
        "time to validation loss" in proc.stdout
        and "ratio time-to-loss ours-no-mtp/baseline@0.003" in proc.stdout
    )
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    parts = {r["part"]: r for r in saved["results"]}
    assert "AdamW lr 0.003" in parts["baseline@0.003"]["what"]
    args = saved["args"]  # the dry run's steps and batch (DRY_RUN)
    timed = range(args["warmup"] + 1, args["warmup"] + args["steps"] + 1)
    for r in parts.values():
        curve = r["curve"]
        assert [p["step"] for p in curve] == list(timed)
        assert [p["tokens"] for p in curve] == [s * args["global_batch"] * args["seq_length"] for s in timed]
        seconds = [p["seconds"] for p in curve]
        assert seconds[0] > 0 and seconds == sorted(seconds) and seconds[-1] <= r["elapsed_s"]
        assert all(3.0 < p["val_loss"] < 10.0 for p in curve), curve  # ln(8192) = 9.01 at initialisation
        assert 0 < r["first_step_s"] <= seconds[0]
        typical = (r["elapsed_s"] - r["first_step_s"]) / (args["steps"] - 1)
        for p in curve:
            assert p["steady_seconds"] == pytest.approx(p["seconds"] - r["first_step_s"] + typical)
