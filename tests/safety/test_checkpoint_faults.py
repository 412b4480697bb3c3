"""Checkpoint faults: the tracker lies, files rot, saves die, disks fill.  Each case is one test.

The end-to-end cases run the real CLI on a copy of one shared 2-process ZeRO-1 run; the rest
call the resolution and verification functions the trainer and the converter use.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from joyai_megatron.checksums import MANIFEST, read_manifest
from joyai_megatron.convert.dist_ckpt import resolve_iteration_dir
from joyai_megatron.convert.to_hf import export_to_hf
from joyai_megatron.training.checkpoint_scan import (
    TRACKER,
    CheckpointError,
    start_point,
    verify_directory,
)
from tests.joyai_helpers import (
    REPO,
    clean_env,
    joyai_command,
    kill_run,
    run_joyai,
    start_joyai,
    write_mock_recipe,
)
from tests.safety.fault_helpers import Run, assert_one_line_error, flip_bit, truncate


def test_zero1_multi_rank_save_has_checksums_for_every_file(trained: Run) -> None:
    step = trained.ckpt / "iter_0000002"
    manifest = read_manifest(step)
    assert manifest is not None
    on_disk = {p.name for p in step.iterdir()} - {MANIFEST, "COMPLETE", "recipe.yaml"}
    assert set(manifest) == on_disk
    assert {n for n in manifest if n.startswith("__1_")}, "rank 1's shard files are hashed too"
    assert verify_directory(step) is None


def test_missing_tracker_resumes_newest_complete(trained: Run, tmp_path: Path) -> None:
    """Defect 1: without the tracker the run trained from step 0 and pruned the old checkpoints."""
    run = trained.copy_to(tmp_path)
    (run.ckpt / TRACKER).unlink()
    result = run_joyai("pretrain", run.recipe, ["train.train_iters=3"])
    assert result.returncode == 0
    assert f"resumed from {run.ckpt / 'iter_0000002'} at step 2" in result.stdout
    assert f"note: {TRACKER} is missing" in result.stdout
    assert sorted(p.name for p in run.ckpt.glob("iter_*")) == [f"iter_000000{i}" for i in (1, 2, 3)]


@pytest.mark.parametrize(
    ("text", "note"),
    [
        ("", "is empty"),
        ("\x00\x13garbage", "is garbled"),
        ("1", "names step 1, the newest complete checkpoint is 2"),
        ("9", "names step 9, the newest complete checkpoint is 2"),
    ],
)
def test_untrustworthy_tracker_is_overruled(trained: Run, tmp_path: Path, text: str, note: str) -> None:
    run = trained.copy_to(tmp_path)
    (run.ckpt / TRACKER).write_text(text)
    start = start_point(run.ckpt, None, allow_fresh_start=False)
    assert start.path == run.ckpt / "iter_0000002" and start.resuming
    assert start.note is not None and note in start.note


def test_no_complete_checkpoint_refuses_fresh_start(trained: Run, tmp_path: Path) -> None:
    run = trained.copy_to(tmp_path)
    for marker in run.ckpt.glob("iter_*/COMPLETE"):
        marker.unlink()
    with pytest.raises(CheckpointError, match="refusing to start from scratch.*allow_fresh_start"):
        start_point(run.ckpt, None, allow_fresh_start=False)
    assert start_point(run.ckpt, None, allow_fresh_start=True).path is None
    (tmp_path / "only_tracker").mkdir()
    (tmp_path / "only_tracker" / TRACKER).write_text("7")
    with pytest.raises(CheckpointError, match="refusing to start from scratch"):
        start_point(tmp_path / "only_tracker", None, allow_fresh_start=False)


def test_bit_flip_in_a_shard_stops_resume_and_offers_the_previous(trained: Run, tmp_path: Path) -> None:
    """Defect 4: same-size corruption loaded silently (grad norm 2.0 -> 29.7)."""
    run = trained.copy_to(tmp_path)
    flip_bit(run.ckpt / "iter_0000002" / "__1_0.distcp")
    result = run_joyai("pretrain", run.recipe, ["train.train_iters=3"])
    assert result.returncode == 2
    assert_one_line_error(
        result.stderr,
        "checkpoint damaged",
        str(run.ckpt / "iter_0000002" / "__1_0.distcp"),
        ", tensor ",
        "sha256 differs",
        f"previous complete checkpoint is {run.ckpt / 'iter_0000001'}",
    )
    assert (run.ckpt / "iter_0000002").is_dir(), "the damaged checkpoint is left for the user to judge"
    assert not (run.ckpt / "iter_0000003").exists()


@pytest.mark.parametrize("name", ["__0_0.distcp", ".metadata", "train_state.json"])
def test_truncated_checkpoint_file_is_named(trained: Run, tmp_path: Path, name: str) -> None:
    """Defect 4: a truncated .distcp gave a bare EOFError with no file and no fallback."""
    run = trained.copy_to(tmp_path)
    truncate(run.ckpt / "iter_0000002" / name)
    with pytest.raises(CheckpointError) as err:
        verify_directory(run.ckpt / "iter_0000002", contents=False)
    message = str(err.value)
    assert f"iter_0000002/{name}" in message and "truncated" in message
    assert "iter_0000001" in message


def test_garbled_manifest_is_named(trained: Run, tmp_path: Path) -> None:
    run = trained.copy_to(tmp_path)
    (run.ckpt / "iter_0000002" / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"{MANIFEST}\): .*unreadable checksum manifest"):
        verify_directory(run.ckpt / "iter_0000002")


def test_kill_during_save_leaves_only_complete_checkpoints(trained: Run, tmp_path: Path) -> None:
    """SIGKILL while a step's save is being written: resume and export never see the partial one."""
    run = trained.copy_to(tmp_path)
    proc = start_joyai(
        "pretrain", run.recipe, ["train.train_iters=50"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not list(run.ckpt.glob("iter_*.tmp")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert kill_run(proc) == -signal.SIGKILL, "the run ended before a save could be interrupted"
    start = start_point(run.ckpt, None, allow_fresh_start=False)
    assert start.path is not None and (start.path / "COMPLETE").is_file()
    assert verify_directory(start.path) is None
    for partial in run.ckpt.glob("iter_*.tmp"):
        with pytest.raises(CheckpointError, match="unfinished checkpoint"):
            resolve_iteration_dir(partial)


def _can_mount_tmpfs(where: Path) -> bool:
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {where}"], capture_output=True
    )
    return probe.returncode == 0


def test_disk_full_during_save_is_named(tmp_path: Path) -> None:
    """Defect 4: ENOSPC during a save showed only "Worker failure".  A real 8 MiB tmpfs fills up
    (a private mount namespace: no root needed where user namespaces are allowed)."""
    full = tmp_path / "full"
    full.mkdir()
    if not _can_mount_tmpfs(full):
        pytest.skip("this machine does not allow a private tmpfs mount (unshare -rm)")
    recipe = write_mock_recipe(tmp_path, model={"mtp_enabled": False}, checkpoint={"dir": str(full / "ckpt")})
    command = " ".join(joyai_command("pretrain", recipe, ["train.train_iters=1"]))
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=8m tmpfs {full} && {command}; echo rc=$?"],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert "rc=2" in result.stdout, result.stdout[-2000:] + result.stderr[-3000:]
    assert_one_line_error(result.stderr, "disk full (ENOSPC)", "iter_0000001.tmp")


def test_training_refuses_negative_train_iters(tmp_path: Path) -> None:
    """Defect 3: train.train_iters=-5 wrote iter_0000000."""
    recipe = write_mock_recipe(tmp_path)
    result = run_joyai("pretrain", recipe, ["train.train_iters=-5"])
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "train.train_iters", "-5 is a negative length")
    assert not (tmp_path / "ckpt").exists()


def test_layout_error_is_one_line(tmp_path: Path) -> None:
    """Defect 5: the training CLI printed a traceback for its own LayoutError."""
    recipe = write_mock_recipe(tmp_path, parallel={"tp": 3})
    result = run_joyai("pretrain", recipe)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "invalid parallel layout")
    debug = subprocess.run(
        [*joyai_command("pretrain", recipe, []), "--debug"], cwd=REPO, env=clean_env(), capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_wrong_type_override_blames_the_command_line(tmp_path: Path) -> None:
    """Defect 5: a bad key=value was reported as an error in the recipe file."""
    recipe = write_mock_recipe(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "joyai_megatron", "pretrain", str(recipe), "train.seed=abc"],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "bad command-line override (train.seed=abc)")
    assert str(recipe) not in result.stderr


def test_to_hf_refuses_incomplete_checkpoints(trained: Run, tmp_path: Path) -> None:
    """Defect 4: to-hf exported an iter_*.tmp or a directory without COMPLETE."""
    run = trained.copy_to(tmp_path)
    partial = run.ckpt / "iter_0000003.tmp"
    (run.ckpt / "iter_0000002").rename(partial)
    with pytest.raises(CheckpointError, match="unfinished checkpoint"):
        export_to_hf(partial, tmp_path / "hf_tmp", progress=False)
    (run.ckpt / "iter_0000001" / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete checkpoint .*COMPLETE\)"):
        export_to_hf(run.ckpt / "iter_0000001", tmp_path / "hf_nomarker", progress=False)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        export_to_hf(run.ckpt, tmp_path / "hf_root", progress=False)
    assert not list(tmp_path.glob("hf_*"))
