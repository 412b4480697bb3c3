"""``data_prep agentic-demo`` and tool-calling data: SFT conversations with tool calls and tool
replies (only the assistant's tokens train), RL environment prompts with their tools."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from data_prep.agentic_demo import MODULUS, build_agentic_demo


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    build_agentic_demo(root, sft_examples=40, explicit_examples=20, rl_prompts=30, eval_prompts=10)
    return root


def _problem(text: str) -> tuple[int, int]:
    expr = text.split(" is ")[1].rstrip("?")
    a, _, b, _, m = expr.split()
    assert int(m) == MODULUS
    return int(a), int(b)


def test_toy_task_is_deterministic_and_held_out(toy, tmp_path):
    build_agentic_demo(tmp_path, sft_examples=40, explicit_examples=20, rl_prompts=30, eval_prompts=10,
                       tokenizer=toy / "tokenizer")  # fmt: skip
    for name in ("sft.jsonl", "rl.jsonl", "eval.jsonl"):
        assert (toy / "raw" / name).read_text() == (tmp_path / "raw" / name).read_text(), name
    sft = [json.loads(line) for line in (toy / "raw" / "sft.jsonl").read_text().splitlines()]
    seen = {_problem(r["messages"][1]["content"]) for r in sft}
    train = [json.loads(line) for line in (toy / "rl" / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (toy / "rl" / "eval.jsonl").read_text().splitlines()]
    seen |= {_problem(r["prompt"].split("<|im_start|>user\n")[1].split("<|im_end|>")[0]) for r in train}
    for record in held:
        a, b = _problem(record["prompt"].split("<|im_start|>user\n")[1].split("<|im_end|>")[0])
        assert (a, b) not in seen
        assert record["answer"] == str(a * b % MODULUS) and record["tools"] == ["calculator"]
        assert '"name": "calculator"' in record["prompt"] and record["enable_thinking"] is False
    # The tool-use demos' tool replies are the calculator's results.
    for record in sft:
        tool = [m for m in record["messages"] if m["role"] == "tool"]
        if tool:
            a, b = _problem(record["messages"][1]["content"])
            assert tool[0]["content"] == str(a * b % MODULUS)


def test_sft_trains_only_the_assistant_turns_of_tool_conversations(toy):
    from data_prep.sft import PackedSFTDataset

    hf = Tokenizer.from_file(str(toy / "tokenizer" / "tokenizer.json"))
    dataset = PackedSFTDataset(str(toy / "sft" / "train.parquet"))
    raw = [json.loads(line) for line in (toy / "raw" / "sft.jsonl").read_text().splitlines()]
    with_tools = 0
    for index in range(len(dataset)):
        item = dataset[index]
        cu = item["cu_seqlens"]
        for start, end in zip(cu[:-1], cu[1:], strict=True):
            labels, mask = item["labels"][start:end], item["loss_mask"][start:end]
            trained = hf.decode(labels[mask > 0].tolist(), skip_special_tokens=False)
            text = hf.decode(item["tokens"][start:end].tolist(), skip_special_tokens=False)
            assert "<|im_start|>" not in trained
            if text.count("<|im_start|>tool") > 1:  # explicit problems chained in one conversation
                assert trained.count("<tool_call>") == text.count("<|im_start|>tool")
            elif "<|im_start|>tool" in text:
                with_tools += 1
                tool_reply = text.split("<|im_start|>tool\n")[1].split("<|im_end|>")[0]
                call = text.split("<|im_start|>assistant\n<think>\n\n</think>\n\n")[1].split("<|im_end|>")[0]
                # The call and the final answer train; the tool reply and the scaffolding do not.
                assert trained == f"{call}<|im_end|>Answer: {tool_reply}<|im_end|>"
                assert call.startswith("<tool_call>\n") and call.endswith("\n</tool_call>")
            else:
                assert trained.startswith("Answer: ") and trained.endswith("<|im_end|>")
    assert with_tools == sum(json.dumps(r).count("tool_calls") == 1 for r in raw) > 0


def test_rl_accepts_environment_prompts_and_refuses_unknown_tools(toy, tmp_path):
    from data_prep.errors import OutputLimits
    from data_prep.rl import prepare_rl

    raw = tmp_path / "env.jsonl"
    records = [
        {"prompt": "What is 2 + 2?", "answer": "4", "tools": ["calculator", "python"]},
        {"prompt": "Hi", "answer": "4", "tools": ["rm_rf"]},
        {"prompt": "Plain", "answer": "1"},
    ]
    raw.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "env_out.jsonl"
    stats = prepare_rl(
        [str(raw)],
        str(toy / "tokenizer"),
        str(out),
        "math",
        "env",
        on_error="skip",
        limits=OutputLimits(max_skip_fraction=0.5),
    )
    assert stats["prompts"] == 2 and stats["skipped"] == {"bad_messages": 1}
    first, plain = (json.loads(line) for line in out.read_text().splitlines())
    assert first["tools"] == ["calculator", "python"] and plain["tools"] is None
    assert '"name": "python"' in first["prompt"] and "# Tools" not in plain["prompt"]
