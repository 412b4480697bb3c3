"""data_prep faults: cut compression streams, empty or mostly-bad inputs, failed re-runs, and data
that parses but cannot teach (identical DPO sides, duplicate RL ids, unknown verifiers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zstandard

from data_prep import indexed
from data_prep.cli import main as data_prep
from tests.safety.fault_helpers import assert_one_line_error

DOCS = [json.dumps({"text": f"document number {i} about checkpoints and disks"}) + "\n" for i in range(400)]


def _zst_frames(path: Path, lines: list[str], per_frame: int) -> Path:
    compressor = zstandard.ZstdCompressor()
    frames = [
        compressor.compress("".join(lines[i : i + per_frame]).encode())
        for i in range(0, len(lines), per_frame)
    ]
    path.write_bytes(b"".join(frames))
    return path


def _pretrain(
    capsys: pytest.CaptureFixture[str],
    tokenizer: Path,
    prefix: Path,
    *inputs: Path,
    extra: tuple[str, ...] = (),
) -> tuple[int, dict, str]:
    args = [
        "pretrain",
        "--input",
        *map(str, inputs),
        "--tokenizer",
        str(tokenizer),
        "--output-prefix",
        str(prefix),
    ]
    code = data_prep([*args, "--workers", "1", "--engine", "hf", "--no-progress", *extra])
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else {}, err


def _cut(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def test_zst_cut_inside_its_first_frame_is_a_counted_skip(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Defect 3: a .zst truncated in its first frame gave 0 documents and no skip."""
    good = tmp_path / "good.jsonl"
    good.write_text("".join(DOCS))
    cut = _zst_frames(tmp_path / "cut.jsonl.zst", DOCS, per_frame=len(DOCS))
    _cut(cut, 0.5)
    code, _, err = _pretrain(capsys, tokenizer_dir, tmp_path / "out", good, cut)
    assert code == 2
    assert_one_line_error(err, f"corrupt_file ({cut}:1)", "truncated")
    code, stats, err = _pretrain(
        capsys,
        tokenizer_dir,
        tmp_path / "out",
        good,
        cut,
        extra=("--on-error", "skip", "--max-skip-fraction", "1"),
    )
    assert code == 0 and stats["skipped"] == {"corrupt_file": 1} and stats["documents"] == len(DOCS)
    assert "skipped: corrupt_file: 1" in err


def test_zst_cut_in_a_later_frame_is_corrupt_file_not_invalid_json(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cut = _zst_frames(tmp_path / "cut.jsonl.zst", DOCS, per_frame=100)
    _cut(cut, 0.9)
    code, stats, _ = _pretrain(
        capsys, tokenizer_dir, tmp_path / "out", cut, extra=("--on-error", "skip", "--max-skip-fraction", "1")
    )
    assert code == 0 and stats["skipped"] == {"corrupt_file": 1}
    assert stats["documents"] == 300, "the three complete frames are kept, the cut one is not read as JSON"


def test_empty_input_is_an_error_unless_allowed(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Defect 3: empty inputs exited 0 with empty outputs (training later: `cannot mmap an empty file`)."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = _pretrain(capsys, tokenizer_dir, tmp_path / "out", empty)
    assert code == 2
    assert_one_line_error(err, "no documents to write", "--allow-empty")
    assert not (tmp_path / "out.bin").exists()
    code, stats, _ = _pretrain(capsys, tokenizer_dir, tmp_path / "out", empty, extra=("--allow-empty",))
    assert code == 0 and stats["documents"] == 0


def test_skipping_every_record_is_an_error(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Defect 3: --on-error skip runs that skipped everything exited 0."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text key"}\n' * 5)
    code, _, err = _pretrain(capsys, tokenizer_dir, tmp_path / "out", bad, extra=("--on-error", "skip"))
    assert code == 2
    assert_one_line_error(err, "no documents to write", "missing_key: 5")


def test_skips_over_the_limit_fail(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(DOCS[:90]) + '{"text": 5}\n' * 10)
    code, _, err = _pretrain(capsys, tokenizer_dir, tmp_path / "out", mixed, extra=("--on-error", "skip"))
    assert code == 2
    assert_one_line_error(err, "too many records skipped", "10 of 100 (10.0%)", "--max-skip-fraction 0.01")
    code, stats, _ = _pretrain(
        capsys,
        tokenizer_dir,
        tmp_path / "out",
        mixed,
        extra=("--on-error", "skip", "--max-skip-fraction", "0.1"),
    )
    assert code == 0 and stats["skipped"] == {"not_string": 10}


def _outputs(prefix: Path) -> dict[str, bytes]:
    return {s: Path(f"{prefix}{s}").read_bytes() for s in (".bin", ".idx", ".stats.json")}


def test_failed_rerun_leaves_the_earlier_set_whole_and_says_so(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Defect 3: a failed re-run left the previous outputs beside its error, unannounced."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(DOCS))
    prefix = tmp_path / "out"
    assert _pretrain(capsys, tokenizer_dir, prefix, data)[0] == 0
    first = _outputs(prefix)
    data.write_text("".join(DOCS) + "{broken\n")
    code, _, err = _pretrain(capsys, tokenizer_dir, prefix, data)
    assert code == 2 and f"{prefix}.bin" in err and "are from an earlier run" in err
    assert _outputs(prefix) == first


def test_kill_during_merge_publishes_nothing(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted at each point of the merge (after the data, at the index), the published set
    is the earlier run's, whole; the next run publishes a set equal to an uninterrupted one."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(DOCS[:200]))
    prefix, clean = tmp_path / "out", tmp_path / "clean"
    assert _pretrain(capsys, tokenizer_dir, prefix, data)[0] == 0
    first = _outputs(prefix)
    data.write_text("".join(DOCS))
    real_write_index, real_publish = indexed.write_index, indexed.publish

    for target, real in (("write_index", real_write_index), ("publish", real_publish)):

        def killed(path: object, *args: object, real: object = real) -> None:
            if ".partial" in str(path) and "shards" not in str(path):
                raise KeyboardInterrupt("killed during the merge")
            real(path, *args)  # type: ignore[operator]

        monkeypatch.setattr(indexed, target, killed)
        with pytest.raises(KeyboardInterrupt):
            data_prep(["pretrain", "--input", str(data), "--tokenizer", str(tokenizer_dir), "--output-prefix",
                       str(prefix), "--workers", "1", "--engine", "hf", "--no-progress"])  # fmt: skip
        monkeypatch.setattr(indexed, target, real)
        assert _outputs(prefix) == first
    capsys.readouterr()
    assert _pretrain(capsys, tokenizer_dir, prefix, data)[0] == 0
    assert _pretrain(capsys, tokenizer_dir, clean, data)[0] == 0
    resumed, fresh = _outputs(prefix), _outputs(clean)
    assert resumed[".bin"] == fresh[".bin"] and resumed[".idx"] == fresh[".idx"]


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_identical_dpo_pairs_are_warned_and_all_identical_refused(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Defect 3: DPO pairs with chosen == rejected were accepted without a word."""
    pair = {"prompt": "2+2?", "chosen": "Answer: 4", "rejected": "Answer: 5"}
    same = {"prompt": "3+3?", "chosen": "Answer: 6", "rejected": "Answer: 6"}
    args = [
        "dpo",
        "--tokenizer",
        str(tokenizer_dir),
        "--seq-length",
        "128",
        "--output",
        str(tmp_path / "d.parquet"),
    ]
    assert data_prep([*args, "--input", str(_jsonl(tmp_path / "mixed.jsonl", [pair, same]))]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["warnings"] == {"identical_pair": 1} and "warning: identical_pair: 1" in err
    assert data_prep([*args, "--input", str(_jsonl(tmp_path / "same.jsonl", [same, same]))]) == 2
    assert_one_line_error(
        capsys.readouterr().err, "unusable preference data", "all 2 pairs have chosen == rejected"
    )


def test_duplicate_rl_ids_and_unknown_verifiers_are_warned(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Defect 3: duplicate RL ids were accepted without a word."""
    records = [
        {"id": "a", "prompt": "1+1?", "answer": "2", "verifier": "math", "domain": "math"},
        {"id": "a", "prompt": "2+2?", "answer": "4", "verifier": "math", "domain": "math"},
        {"id": "b", "prompt": "3+3?", "answer": "6", "verifier": "magic", "domain": "math"},
    ]
    path = _jsonl(tmp_path / "rl.jsonl", records)
    code = data_prep(
        [
            "rl",
            "--input",
            str(path),
            "--tokenizer",
            str(tokenizer_dir),
            "--output",
            str(tmp_path / "rl.out.jsonl"),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0
    assert json.loads(out)["warnings"] == {"duplicate_id": 1, "unknown_verifier:magic": 1}
    assert "warning: duplicate_id: 1, unknown_verifier:magic: 1" in err


def test_corrupt_tokenizer_json_is_named(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Defect 4: a corrupt tokenizer.json ended in a traceback naming no file."""
    broken = tmp_path / "tok"
    broken.mkdir()
    text = (tokenizer_dir / "tokenizer.json").read_text()
    (broken / "tokenizer.json").write_text(text[: len(text) // 3])
    data = tmp_path / "data.jsonl"
    data.write_text("".join(DOCS[:5]))
    code, _, err = _pretrain(capsys, broken, tmp_path / "out", data)
    assert code == 2
    assert_one_line_error(err, "unreadable tokenizer", str(broken / "tokenizer.json"))
