"""``data_prep pretrain``: round trip through Megatron-Core, engines, dtype, resume, bad input."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from megatron.core.datasets.indexed_dataset import IndexedDataset
from tokenizers import Tokenizer

from data_prep.cli import main
from data_prep.errors import OutputLimits
from data_prep.pretrain import PretrainConfig, run_pretrain
from data_prep.tokenizer import make_encoder
from tests.joyai_helpers import REPO

TRICKY = [
    "hello <|end_of_text|> world <think>x</think> <|im_start|>",
    "  leading spaces\r\n\r\nCRLF\t\ttabs 1234567 ١٢٣ 中文字符かなカナ",
    "émoji 🎉🎉 ZWJ 👨‍👩‍👧 combining é and Ω≈ç√",
    "a" * 5000,
    "\x00ctrl\x1f and trailing   ",
    "x",
]


def _texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def _mixed_inputs(corpus: Path, root: Path) -> tuple[list[Path], list[str]]:
    """The corpus as plain JSONL, .gz, .zst and Parquet (named so sorted order is known)."""
    root.mkdir(parents=True, exist_ok=True)
    src = sorted((corpus / "pretrain").glob("*.jsonl"))
    topics = root / "a.jsonl"
    shutil.copy(corpus / "pretrain" / "topics.jsonl", topics)
    (root / "b.jsonl.gz").write_bytes(gzip.compress(src[0].read_bytes()))
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(src[1].read_bytes()))
    pq.write_table(pa.table({"text": _texts(src[2]) + TRICKY}), root / "d.parquet")
    files = [topics, root / "b.jsonl.gz", root / "c.jsonl.zst", root / "d.parquet"]
    return files, _texts(topics) + _texts(src[0]) + _texts(src[1]) + _texts(src[2]) + TRICKY


def _same_output(a: str, b: str) -> bool:
    return all(Path(a + s).read_bytes() == Path(b + s).read_bytes() for s in (".bin", ".idx"))


def test_round_trip_equals_hf_encode_plus_eod(corpus: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    files, texts = _mixed_inputs(corpus, tmp_path / "in")
    prefix = str(tmp_path / "out" / "docs")
    stats = run_pretrain(
        PretrainConfig(
            inputs=[str(tmp_path / "in" / "*")],
            tokenizer=str(tokenizer_dir),
            output_prefix=prefix,
            workers=2,
            progress=False,
        )
    )
    hf = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    dataset = IndexedDataset(prefix)
    assert len(dataset) == len(texts) == stats["documents"]
    assert dataset[0].dtype == np.uint16
    for i, text in enumerate(texts):
        assert dataset[i].tolist() == hf.encode(text, add_special_tokens=False).ids + [1], f"document {i}"
    assert stats["tokens"] == int(dataset.sequence_lengths.sum())
    assert stats["bytes"] == sum(len(t.encode()) for t in texts)
    assert stats["skipped"] == {} and stats["tokens_per_second"] > 0 and stats["engine"] == ["gigatoken"]
    assert json.loads(Path(prefix + ".stats.json").read_text())["documents"] == len(texts)
    assert not Path(prefix + ".shards").exists()

    hf_prefix = str(tmp_path / "out" / "docs_hf")
    run_pretrain(
        PretrainConfig(
            inputs=[str(f) for f in files],
            tokenizer=str(tokenizer_dir),
            output_prefix=hf_prefix,
            engine="hf",
            progress=False,
        )
    )
    assert _same_output(prefix, hf_prefix)


def test_gigatoken_matches_hf_on_corpus(corpus: Path, tokenizer_dir: Path) -> None:
    texts = [t for p in sorted((corpus / "pretrain").glob("*.jsonl")) for t in _texts(p)] + TRICKY
    fast = make_encoder(tokenizer_dir, "gigatoken")
    reference = make_encoder(tokenizer_dir, "hf")
    assert fast.name == "gigatoken"
    for got, want in zip(fast.encode_flat(texts), reference.encode_flat(texts), strict=True):
        assert np.array_equal(got, want)


def test_vocab_over_uint16_writes_int32(corpus: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    base = len(data["model"]["vocab"])
    data["model"]["vocab"].update(
        {f"<unused_{i}>": base + i for i in range(70000 - base)}
    )  # ids never produced
    big = tmp_path / "big"
    big.mkdir()
    (big / "tokenizer.json").write_text(json.dumps(data))
    prefix = str(tmp_path / "big_docs")
    run_pretrain(
        PretrainConfig(
            inputs=[str(corpus / "pretrain" / "topics.jsonl")],
            tokenizer=str(big),
            output_prefix=prefix,
            progress=False,
        )
    )
    dataset = IndexedDataset(prefix)
    hf = Tokenizer.from_file(str(big / "tokenizer.json"))
    assert dataset[0].dtype == np.int32
    assert [dataset[i].tolist() for i in range(3)] == [
        hf.encode(t, add_special_tokens=False).ids + [1]
        for t in _texts(corpus / "pretrain" / "topics.jsonl")[:3]
    ]


def test_resume_after_kill_is_byte_identical(corpus: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    text = (corpus / "pretrain" / "topics.jsonl").read_bytes() + (
        corpus / "pretrain" / "docstrings-0.jsonl"
    ).read_bytes()
    for k in range(5):
        (inputs / f"part-{k}.jsonl").write_bytes(text)
    args = [
        "--input",
        str(inputs / "*.jsonl"),
        "--tokenizer",
        str(tokenizer_dir),
        "--engine",
        "hf",
        "--workers",
        "1",
        "--no-progress",
    ]
    killed = str(tmp_path / "killed" / "docs")
    Path(killed).parent.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_prep", "pretrain", *args, "--output-prefix", killed],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first_shard = Path(killed + ".shards") / "00000.json"
    deadline = time.monotonic() + 120
    while not first_shard.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first_shard.exists(), "the job ended before its first shard completed"
    assert not Path(killed + ".bin").exists() and not Path(killed + ".idx").exists(), "killed too late"
    assert not (Path(killed + ".shards") / "00004.json").exists()

    assert main(["pretrain", *args, "--output-prefix", killed]) == 0
    assert json.loads(Path(killed + ".stats.json").read_text())["resumed_shards"] >= 1
    clean = str(tmp_path / "clean" / "docs")
    assert main(["pretrain", *args, "--output-prefix", clean]) == 0
    assert _same_output(killed, clean)


GOOD = b'{"text": "a good document"}\n'
BAD_INPUTS = [
    ("x.jsonl", GOOD + b'{"text": unquoted}\n', "invalid_json", 2),
    ("x.jsonl", GOOD + b'{"body": "no text key"}\n', "missing_key", 2),
    ("x.jsonl", b'{"text": 42}\n' + GOOD, "not_string", 1),
    ("x.jsonl", GOOD + GOOD + b'{"text": "caf\xe9"}\n', "invalid_utf8", 3),
    ("x.jsonl", b'{"text": "\\ud800 lone surrogate"}\n' + GOOD, "invalid_utf8", 1),
    ("x.jsonl", GOOD + b'{"text": "  \\n "}\n', "empty", 2),
    ("x.jsonl", GOOD + b'{"text": "' + b"long " * 100 + b'"}\n', "too_long", 2),
    ("x.jsonl.gz", gzip.compress(GOOD * 50)[:-30], "corrupt_file", 1),
    ("x.parquet", b"PAR1 this is not a parquet file PAR1", "corrupt_file", 1),
]


def _write_bad(tmp_path: Path, name: str, payload: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(payload)
    return path


@pytest.mark.parametrize(("name", "payload", "reason", "line"), BAD_INPUTS)
def test_bad_input_fails_with_location(
    tmp_path: Path,
    tokenizer_dir: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    payload: bytes,
    reason: str,
    line: int,
) -> None:
    path = _write_bad(tmp_path, name, payload)
    prefix = tmp_path / "out"
    code = main(
        [
            "pretrain",
            "--input",
            str(path),
            "--tokenizer",
            str(tokenizer_dir),
            "--output-prefix",
            str(prefix),
            "--max-doc-bytes",
            "200",
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    assert code == 2
    assert f"{reason} ({path}:{line}): " in capsys.readouterr().err
    for bin_file in tmp_path.rglob("*.bin"):  # never a .bin without its .idx
        assert bin_file.with_suffix(".idx").exists()
    assert not Path(f"{prefix}.bin").exists()


@pytest.mark.parametrize(("name", "payload", "reason", "line"), BAD_INPUTS)
def test_bad_input_skipped_and_counted(
    tmp_path: Path, tokenizer_dir: Path, name: str, payload: bytes, reason: str, line: int
) -> None:
    path = _write_bad(tmp_path, name, payload)
    good = _write_bad(tmp_path, "z_good.jsonl", GOOD)
    stats = run_pretrain(
        PretrainConfig(
            inputs=[str(path), str(good)],
            tokenizer=str(tokenizer_dir),
            output_prefix=str(tmp_path / "out"),
            on_error="skip",
            limits=OutputLimits(max_skip_fraction=1.0),
            max_doc_bytes=200,
            progress=False,
        )
    )
    assert stats["skipped"] == {reason: 1}
    assert stats["documents"] == len(IndexedDataset(str(tmp_path / "out"))) >= 1


def test_parquet_null_and_non_string_columns(tmp_path: Path, tokenizer_dir: Path) -> None:
    pq.write_table(pa.table({"text": ["ok", None, "fine"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
    stats = run_pretrain(
        PretrainConfig(
            inputs=[str(tmp_path / "*.parquet")],
            tokenizer=str(tokenizer_dir),
            output_prefix=str(tmp_path / "out"),
            on_error="skip",
            limits=OutputLimits(max_skip_fraction=1.0),
            progress=False,
        )
    )
    assert stats["skipped"] == {"missing_key": 2, "not_string": 2}
    assert stats["documents"] == 2


def test_bad_record_in_worker_process_reports_location(
    tmp_path: Path, corpus: Path, tokenizer_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(corpus / "pretrain" / "topics.jsonl", tmp_path / "a.jsonl")
    bad = _write_bad(tmp_path, "b.jsonl", GOOD + b'{"text": 3}\n')
    code = main(
        [
            "pretrain",
            "--input",
            str(tmp_path / "*.jsonl"),
            "--tokenizer",
            str(tokenizer_dir),
            "--output-prefix",
            str(tmp_path / "out"),
            "--workers",
            "2",
            "--no-progress",
        ]
    )
    assert code == 2
    assert f"not_string ({bad}:2): " in capsys.readouterr().err
    assert not Path(f"{tmp_path / 'out'}.bin").exists()
