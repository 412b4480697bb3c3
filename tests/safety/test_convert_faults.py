"""Conversion faults: overlapping paths, foreign directories, damaged exports and inputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from joyai_megatron.checksums import MANIFEST
from joyai_megatron.convert.__main__ import main as convert
from joyai_megatron.convert.common import OUTPUT_MARKER
from tests.safety.fault_helpers import Run, assert_one_line_error, flip_bit, truncate


def _convert(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = convert([*argv, "--no-progress"])
    return code, capsys.readouterr().err


def test_to_hf_output_containing_the_checkpoint_is_refused(
    trained: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Defect 2: `to-hf --checkpoint D --output PARENT_OF_D --overwrite` deleted D."""
    run = trained.copy_to(tmp_path / "run")
    code, err = _convert(
        capsys, "to-hf", "--checkpoint", str(run.ckpt), "--output", str(run.ckpt.parent), "--overwrite"
    )
    assert code == 2
    assert_one_line_error(err, "output overlaps the input", f"it contains the input {run.ckpt}")
    assert (run.ckpt / "iter_0000002" / "COMPLETE").is_file()


def test_to_hf_output_inside_the_checkpoint_is_refused(
    trained: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = trained.copy_to(tmp_path / "run")
    code, err = _convert(capsys, "to-hf", "--checkpoint", str(run.ckpt), "--output", str(run.ckpt / "hf"))
    assert code == 2
    assert_one_line_error(err, "output overlaps the input", "lies inside")
    assert not (run.ckpt / "hf").exists()


def test_from_hf_onto_its_own_input_is_refused(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Defect 2: `from-hf --hf D --output D --overwrite` deleted D."""
    hf = tmp_path / "hf"
    shutil.copytree(exported, hf)
    before = sorted(p.name for p in hf.iterdir())
    code, err = _convert(capsys, "from-hf", "--hf", str(hf), "--output", str(hf), "--overwrite")
    assert code == 2
    assert_one_line_error(err, "output overlaps the input", "it is the input")
    assert sorted(p.name for p in hf.iterdir()) == before


def test_overwrite_spares_directories_the_tool_did_not_write(
    trained: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    foreign = tmp_path / "my_models"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, err = _convert(
        capsys, "to-hf", "--checkpoint", str(trained.ckpt), "--output", str(foreign), "--overwrite"
    )
    assert code == 2
    assert_one_line_error(err, "refusing to overwrite", OUTPUT_MARKER)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_export_and_import_carry_checksums_that_verify(
    trained: Run, exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (exported / MANIFEST).is_file() and (exported / OUTPUT_MARKER).is_file()
    assert convert(["verify", "--checkpoint", str(trained.ckpt), "--hf", str(exported), "--no-progress"]) == 0
    assert convert(["verify", "--checkpoint", str(trained.ckpt), "--no-progress"]) == 0
    assert "every file matches checksums.json" in capsys.readouterr().out
    imported = tmp_path / "imported"
    assert convert(["from-hf", "--hf", str(exported), "--output", str(imported), "--no-progress"]) == 0
    step = imported / "iter_0000000"
    assert (step / "COMPLETE").is_file() and (step / MANIFEST).is_file()
    assert convert(["verify", "--checkpoint", str(imported), "--hf", str(exported), "--no-progress"]) == 0


def test_bit_flip_in_an_export_is_named_by_verify(
    trained: Run, exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hf = tmp_path / "hf"
    shutil.copytree(exported, hf)
    shard = sorted(hf.glob("*.safetensors"))[-1]
    flip_bit(shard)
    code, err = _convert(capsys, "verify", "--checkpoint", str(trained.ckpt), "--hf", str(hf))
    assert code == 2
    assert_one_line_error(err, "output damaged", str(shard), "sha256 differs")


def test_bit_flip_in_a_checkpoint_is_named_by_verify(
    trained: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = trained.copy_to(tmp_path)
    flip_bit(run.ckpt / "iter_0000002" / "__0_0.distcp")
    code, err = _convert(capsys, "verify", "--checkpoint", str(run.ckpt))
    assert code == 2
    assert_one_line_error(err, "checkpoint damaged", "__0_0.distcp, tensor ", str(run.ckpt / "iter_0000001"))


def test_truncated_safetensors_shard_is_named(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Defect 4: a truncated shard ended in a traceback naming no file."""
    hf = tmp_path / "hf"
    shutil.copytree(exported, hf)
    shard = sorted(hf.glob("*.safetensors"))[0]
    truncate(shard, 0.6)
    code, err = _convert(capsys, "from-hf", "--hf", str(hf), "--output", str(tmp_path / "out"))
    assert code == 2
    assert_one_line_error(err, "truncated safetensors file", str(shard))
    assert not (tmp_path / "out").exists()


def test_malformed_config_json_is_named(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Defect 4: a malformed config.json ended in a JSONDecodeError traceback."""
    hf = tmp_path / "hf"
    shutil.copytree(exported, hf)
    text = (hf / "config.json").read_text()
    (hf / "config.json").write_text(text[: len(text) // 2])
    code, err = _convert(capsys, "from-hf", "--hf", str(hf), "--output", str(tmp_path / "out"))
    assert code == 2
    assert_one_line_error(err, "malformed config.json", str(hf / "config.json"))
