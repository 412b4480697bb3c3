"""``checkpoint.save_at_end=false``: a run that needs no checkpoint (a benchmark) writes none.

The 2.3B proxy's end-of-run save is ~15 GB with its optimizer: on a 64 GB GPU machine, two
benchmark parts' saves filled the disk and the writer hung (H200, 2026-12-04).
"""

from __future__ import annotations

from pathlib import Path

from tests.joyai_helpers import read_metrics, run_joyai, write_mock_recipe


def test_no_checkpoint_when_save_at_end_is_false(tmp_path: Path) -> None:
    recipe = write_mock_recipe(tmp_path, checkpoint={"save_at_end": False})
    result = run_joyai("pretrain", recipe)
    assert result.returncode == 0
    assert "checkpoint none (checkpoint.save_at_end=false)" in result.stdout
    assert len(read_metrics(tmp_path / "logs")) == 2  # it trained
    assert not list((tmp_path / "ckpt").glob("iter_*"))


def test_the_default_still_saves_at_the_end(tmp_path: Path) -> None:
    result = run_joyai("pretrain", write_mock_recipe(tmp_path))
    assert result.returncode == 0
    assert (tmp_path / "ckpt" / "iter_0000002").is_dir()
