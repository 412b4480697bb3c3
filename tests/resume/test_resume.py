"""Checkpoint/resume: bitwise-equal continuation, SIGTERM save-and-exit, kills during saves, async
saves.  Resuming on another layout, with the optimizer state: test_layouts.py."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from joyai_megatron.training.checkpoint import latest_iteration
from tests.joyai_helpers import kill_run, read_metrics, run_joyai, start_joyai, write_mock_recipe

N = 4


def _start(recipe: Path, overrides: list[str]) -> subprocess.Popen:
    return start_joyai(
        "pretrain", recipe, overrides, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(
                f"run ended (rc={proc.returncode}) before the condition:\n{proc.stdout.read()[-4000:]}"
            )
        if time.time() > deadline:
            kill_run(proc)
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.02)


def _steps(log_dir: Path) -> list[int]:
    path = log_dir / "metrics.jsonl"
    return [m["step"] for m in read_metrics(log_dir)] if path.exists() else []


@pytest.mark.parametrize("optimizer", ["muon", "adam"])
def test_sigkill_resume_is_bitwise_identical(tmp_path, optimizer):
    """2N steps uninterrupted == N steps, SIGKILL, resume (losses for N+1..2N, bitwise in fp32)."""
    sections = {"optim": {"optimizer": optimizer, "lr": 3e-3}, "train": {"seq_length": 256}}
    straight = write_mock_recipe(tmp_path / "straight", **sections)
    assert run_joyai("pretrain", straight, [f"train.train_iters={2 * N}"]).returncode == 0
    expected = {m["step"]: m for m in read_metrics(tmp_path / "straight" / "logs")}

    killed = write_mock_recipe(tmp_path / "killed", **sections)
    proc = _start(killed, [f"train.train_iters={2 * N}", f"checkpoint.save_interval={N}"])
    ckpt = tmp_path / "killed" / "ckpt"
    _wait_for(lambda: latest_iteration(ckpt) == N, proc)
    kill_run(proc)
    proc.wait()
    assert latest_iteration(ckpt) == N, "the run finished before it could be killed"

    assert (
        run_joyai(
            "pretrain", killed, [f"train.train_iters={2 * N}", f"checkpoint.save_interval={N}"]
        ).returncode
        == 0
    )
    resumed = [m for m in read_metrics(tmp_path / "killed" / "logs") if m["step"] > N][-N:]
    assert [m["step"] for m in resumed] == list(range(N + 1, 2 * N + 1))
    for m in resumed:
        ref = expected[m["step"]]
        for key in ("loss", "lm_loss", "mtp_loss", "grad_norm", "lr"):
            assert m[key] == ref[key], (optimizer, m["step"], key, m[key], ref[key])


def test_sigterm_saves_exits_zero_and_resumes_at_next_step(tmp_path):
    recipe = write_mock_recipe(tmp_path / "run", train={"seq_length": 256})
    proc = _start(recipe, ["train.train_iters=200"])
    _wait_for(lambda: len(_steps(tmp_path / "run" / "logs")) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    saved = latest_iteration(tmp_path / "run" / "ckpt")
    assert saved is not None and 2 <= saved < 200
    assert f"signal at step {saved}" in out

    assert run_joyai("pretrain", recipe, [f"train.train_iters={saved + 2}"]).returncode == 0
    steps = _steps(tmp_path / "run" / "logs")
    assert steps[-2:] == [saved + 1, saved + 2]


def test_kill_during_checkpoint_write_never_leaves_a_resumable_partial(tmp_path):
    """SIGKILL at arbitrary moments of a run that saves every step: whatever the moment, the
    tracker names a complete checkpoint, and resume continues right after it."""
    recipe = write_mock_recipe(tmp_path / "run", train={"seq_length": 256})
    ckpt = tmp_path / "run" / "ckpt"
    for delay in (0.0, 0.15, 0.3):
        proc = _start(
            recipe, ["train.train_iters=400", "checkpoint.save_interval=1", "checkpoint.keep_last=2"]
        )
        start = latest_iteration(ckpt) or 0
        _wait_for(lambda start=start: (latest_iteration(ckpt) or 0) > start, proc)
        time.sleep(delay)
        kill_run(proc)
        step = latest_iteration(ckpt)
        assert (ckpt / f"iter_{step:07d}" / "COMPLETE").is_file()
        assert (ckpt / f"iter_{step:07d}" / "train_state.json").is_file()
    step = latest_iteration(ckpt)
    assert run_joyai("pretrain", recipe, [f"train.train_iters={step + 1}"]).returncode == 0
    assert _steps(tmp_path / "run" / "logs")[-1] == step + 1
    assert not list(ckpt.glob("iter_*.tmp")), "a finished save prunes temp directories left by kills"


def test_async_save_commits_every_checkpoint_and_resumes_exactly(tmp_path):
    """Asynchronous saves (background writer) still commit atomically and resume bitwise."""
    straight = write_mock_recipe(tmp_path / "straight")
    assert run_joyai("pretrain", straight, ["train.train_iters=5"]).returncode == 0
    expected = read_metrics(tmp_path / "straight" / "logs")[-1]

    recipe = write_mock_recipe(tmp_path / "async", checkpoint={"async_save": True, "save_interval": 2})
    assert run_joyai("pretrain", recipe, ["train.train_iters=4"]).returncode == 0
    ckpt = tmp_path / "async" / "ckpt"
    assert latest_iteration(ckpt) == 4
    assert all((ckpt / f"iter_{s:07d}" / "COMPLETE").is_file() for s in (2, 4))
    assert not list(ckpt.glob("iter_*.tmp"))
    assert run_joyai("pretrain", recipe, ["train.train_iters=5"]).returncode == 0
    got = read_metrics(tmp_path / "async" / "logs")[-1]
    assert got["step"] == 5 and got["loss"] == expected["loss"] and got["grad_norm"] == expected["grad_norm"]
