"""Blend YAML validation, the generated corpus and synthetic sets, the demo tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from data_prep.blend import BlendError, data_path_args, load_blend
from data_prep.chat import TEMPLATE_PATH, parse_conversation
from data_prep.cli import main
from data_prep.demo import make_corpus


def _dataset(prefix: Path) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".bin", ".idx"):
        Path(f"{prefix}{suffix}").write_bytes(b"")


def test_load_blend_resolves_relative_prefixes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _dataset(tmp_path / "data" / "a")
    _dataset(tmp_path / "b")
    blend = tmp_path / "blend.yaml"
    blend.write_text(
        f"datasets:\n  - prefix: data/a\n    weight: 3\n  - prefix: {tmp_path / 'b'}\n    weight: 0.5\n"
    )
    prefixes, weights = load_blend(blend)
    assert prefixes == [str(tmp_path / "data" / "a"), str(tmp_path / "b")] and weights == [3.0, 0.5]
    assert data_path_args(prefixes, weights) == ["3.0", prefixes[0], "0.5", prefixes[1]]
    assert main(["blend", str(blend)]) == 0
    assert json.loads(capsys.readouterr().out)["data_path"][1] == prefixes[0]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("datasets:\n  - prefix: a\n    weight: -1\n", "datasets[0].weight: expected a positive number"),
        ("datasets:\n  - prefix: a\n    weight: true\n", "datasets[0].weight: expected a positive number"),
        (
            "datasets:\n  - prefix: a\n    weight: 1\n  - prefix: missing\n    weight: 1\n",
            "datasets[1].prefix: {root}/missing.bin does not exist",
        ),
        ("datasets:\n  - prefix: a\n    weight: 1\n    split: 2\n", "datasets[0]: unknown key 'split'"),
        ("datasets:\n  - weight: 1\n", "datasets[0]: missing key 'prefix'"),
        ("paths: [a]\n", "expected a mapping with exactly one key 'datasets'"),
        ("datasets: [\n", "cannot read blend"),
    ],
)
def test_blend_errors_name_file_and_key(tmp_path: Path, body: str, message: str) -> None:
    _dataset(tmp_path / "a")
    blend = tmp_path / "blend.yaml"
    blend.write_text(body)
    with pytest.raises(BlendError) as error:
        load_blend(blend)
    assert str(error.value).startswith(f"{blend}: ") and message.format(root=tmp_path) in str(error.value)


def test_corpus_is_deterministic_small_and_well_formed(corpus: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    files = make_corpus(again)
    assert all(f.read_bytes() == (corpus / f.relative_to(again)).read_bytes() for f in files)
    pretrain = sum(f.stat().st_size for f in (again / "pretrain").glob("*.jsonl"))
    assert 1 << 20 < pretrain < 5 << 20
    for line_no, line in enumerate((again / "sft" / "train.jsonl").read_text().splitlines(), start=1):
        parse_conversation(json.loads(line), "train.jsonl", line_no, True)
    pair = json.loads((again / "dpo" / "train.jsonl").read_text().splitlines()[0])
    assert pair["chosen"].startswith("Answer: ") and pair["chosen"] != pair["rejected"]
    prompt = json.loads((again / "rl" / "train.jsonl").read_text().splitlines()[0])
    assert {"id", "prompt", "answer", "verifier", "domain"} <= set(prompt) and prompt["verifier"] == "math"


def test_demo_tokenizer_special_ids(tokenizer_dir: Path) -> None:
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    names = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|pad|>",
        "<|im_start|>",
        "<|im_end|>",
        "<think>",
        "</think>",
        "<tool_call>",
        "</tool_call>",
    ]
    assert [tokenizer.token_to_id(n) for n in names] == list(range(9))
    assert tokenizer.get_vocab_size() == 8192
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|end_of_text|>" and config["pad_token"] == "<|pad|>"
    assert config["chat_template"] == TEMPLATE_PATH.read_text()
