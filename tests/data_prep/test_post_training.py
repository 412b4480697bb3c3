"""SFT packing and reader, DPO pairs, RL prompts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from data_prep.cli import main
from data_prep.dpo import PreferenceDataset, prepare_dpo
from data_prep.errors import OutputLimits
from data_prep.packing import best_fit_decreasing
from data_prep.rl import prepare_rl, read_rl_prompts
from data_prep.sft import PackedSFTDataset, prepare_sft


def _jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_best_fit_decreasing() -> None:
    lengths = [6, 5, 4, 3, 2, 2, 1, 1]
    rows = best_fit_decreasing(lengths, 8)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 8 for row in rows)
    assert len(rows) == 3  # 24 tokens in 3 rows of 8: optimal
    assert rows == best_fit_decreasing(lengths, 8)
    with pytest.raises(ValueError):
        best_fit_decreasing([9], 8)


@pytest.mark.parametrize("seq_length", [512, 4096])
def test_sft_packing_waste_under_two_percent(
    corpus: Path, tokenizer_dir: Path, tmp_path: Path, seq_length: int
) -> None:
    out = tmp_path / "sft.parquet"
    stats = prepare_sft([str(corpus / "sft" / "train.jsonl")], str(tokenizer_dir), str(out), seq_length)
    assert stats["sequences"] == stats["conversations"] == 3000
    assert stats["padding_fraction"] < 0.02
    assert stats["padding_tokens"] == stats["rows"] * seq_length - stats["tokens"]


def test_packed_sft_items(corpus: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sft.parquet"
    prepare_sft([str(corpus / "sft" / "eval.jsonl")], str(tokenizer_dir), str(out), 512)
    dataset = PackedSFTDataset(str(out))
    hf = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    total_tokens = 0
    for index in range(len(dataset)):
        item = dataset[index]
        tokens, labels, loss_mask, cu = item["tokens"], item["labels"], item["loss_mask"], item["cu_seqlens"]
        assert cu.dtype == np.int32 and cu[0] == 0 and cu[-1] == len(tokens) <= 512
        total_tokens += len(tokens)
        for start, end in zip(cu[:-1], cu[1:], strict=True):
            assert item["position_ids"][start:end].tolist() == list(range(end - start))
            assert labels[start : end - 1].tolist() == tokens[start + 1 : end].tolist()
            assert loss_mask[end - 1] == 0
            text = hf.decode(tokens[start:end].tolist(), skip_special_tokens=False)
            assert text.startswith("<|im_start|>") and text.endswith("<|im_end|>\n")
            # every trained label is a reply token: decoding them gives only assistant text
            trained = hf.decode(
                labels[start:end][loss_mask[start:end] > 0].tolist(), skip_special_tokens=False
            )
            assert "<|im_start|>" not in trained and trained.endswith("<|im_end|>")
    assert total_tokens == json.loads(Path(f"{out}.stats.json").read_text())["tokens"]

    padded = PackedSFTDataset(str(out), pad_to=600)[0]
    assert len(padded["tokens"]) == 600 and padded["cu_seqlens"][-1] == 600
    assert padded["loss_mask"][len(dataset[0]["tokens"]) :].sum() == 0


def test_sft_bad_records(tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Answer: 1"}]}
    long = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "a"}]}
    path = _jsonl(tmp_path / "chat.jsonl", [good, {"messages": [{"role": "wizard", "content": "x"}]}, long])
    args = [
        "sft",
        "--input",
        str(path),
        "--tokenizer",
        str(tokenizer_dir),
        "--output",
        str(tmp_path / "o.parquet"),
        "--seq-length",
        "64",
    ]
    assert main(args) == 2
    assert f"unknown_role ({path}:2): " in capsys.readouterr().err
    assert main([*args, "--on-error", "skip"]) == 2  # 2 of 3 dropped: over --max-skip-fraction
    assert "too many records skipped" in capsys.readouterr().err
    assert main([*args, "--on-error", "skip", "--max-skip-fraction", "0.7"]) == 0
    stats = json.loads(Path(tmp_path / "o.parquet.stats.json").read_text())
    assert stats["skipped"] == {"unknown_role": 1, "too_long": 1} and stats["sequences"] == 1


def test_preference_dataset(corpus: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    records = [json.loads(line) for line in (corpus / "dpo" / "eval.jsonl").read_text().splitlines()]
    records.append(
        {
            "prompt": [
                {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "Answer: 1"},
                {"role": "user", "content": "q2"},
            ],
            "chosen": {"role": "assistant", "content": "Answer: 2"},
            "rejected": [{"role": "assistant", "content": "Answer: 3"}],
        }
    )
    path = _jsonl(tmp_path / "pairs.jsonl", records)
    out = tmp_path / "dpo.parquet"
    stats = prepare_dpo([str(path)], str(tokenizer_dir), str(out), 96)
    dataset = PreferenceDataset(str(out))
    assert len(dataset) == stats["pairs"] == len(records)
    hf = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    for index, record in ((0, records[0]), (len(records) - 1, records[-1])):
        item = dataset[index]
        for side in ("chosen", "rejected"):
            tokens, labels, loss_mask = (
                item[f"{side}_tokens"],
                item[f"{side}_labels"],
                item[f"{side}_loss_mask"],
            )
            assert tokens.shape == labels.shape == loss_mask.shape == (96,)
            assert (tokens[item[f"{side}_length"] :] == dataset.pad_id).all()
            trained = hf.decode(labels[loss_mask > 0].tolist(), skip_special_tokens=False)
            reply = record[side] if isinstance(record[side], str) else None
            expected = (reply or ("Answer: 2" if side == "chosen" else "Answer: 3")) + "<|im_end|>"
            assert trained == expected  # response only: not the prompt, not the prompt's earlier reply


def test_rl_prompts(corpus: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "rl.jsonl"
    stats = prepare_rl([str(corpus / "rl" / "eval.jsonl")], str(tokenizer_dir), str(out))
    prompts = read_rl_prompts(out)
    assert stats["prompts"] == len(prompts) == 100 and set(stats["domains"]) == {"math", "counting"}
    hf = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    for prompt in prompts[:20]:
        assert prompt.prompt.startswith("<|im_start|>user\n") and prompt.prompt.endswith(
            "<|im_start|>assistant\n"
        )
        assert prompt.prompt_ids == hf.encode(prompt.prompt, add_special_tokens=False).ids
        assert prompt.verifier == "math" and prompt.answer.isdigit() and prompt.id.startswith("rl-")


def test_rl_defaults_and_errors(tokenizer_dir: Path, tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "What is 2 plus 2?", "answer": 4},
            {
                "messages": [{"role": "user", "content": "Write tests"}],
                "tests": ["assert f() == 1"],
                "domain": "code",
            },
            {"prompt": "no answer"},
        ],
    )
    out = tmp_path / "rl.jsonl"
    stats = prepare_rl(
        [str(path)],
        str(tokenizer_dir),
        str(out),
        default_verifier="math",
        default_domain="math",
        enable_thinking=False,
        on_error="skip",
        limits=OutputLimits(max_skip_fraction=1.0),
    )
    assert stats["skipped"] == {"missing_key": 1}
    first, second = read_rl_prompts(out)
    assert first.answer == "4" and first.domain == "math" and first.prompt.endswith("<think>\n\n</think>\n\n")
    assert second.tests == ["assert f() == 1"] and second.domain == "code" and second.answer is None
