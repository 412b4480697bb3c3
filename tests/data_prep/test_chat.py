"""Chat template: HF parity, exact assistant masks, thinking modes, validation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from data_prep.chat import encode_rendered, parse_conversation, render
from data_prep.errors import BadRecord
from data_prep.tokenizer import make_encoder

CALL = {"type": "function", "function": {"name": "lookup_code", "arguments": {"word": "plum"}}}


def _masked(tokenizer_dir: Path, record: dict[str, Any]) -> tuple[str, list[str]]:
    """The rendered text and the decoded runs of consecutive assistant-mask tokens."""
    text, spans = render(parse_conversation(record, "t.jsonl", 1, True))
    ids, mask = encode_rendered(make_encoder(tokenizer_dir), [(text, spans)])[0]
    hf = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    runs, current = [], []
    for token, flag in zip(ids.tolist(), mask.tolist(), strict=True):
        if flag:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return text, [hf.decode(r, skip_special_tokens=False) for r in runs]


def test_non_thinking_masks_only_the_answer(tokenizer_dir: Path) -> None:
    text, runs = _masked(
        tokenizer_dir,
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Code of plum?"},
                {"role": "assistant", "content": "Answer: PLU"},
            ]
        },
    )
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCode of plum?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nAnswer: PLU<|im_end|>\n"
    )
    assert runs == ["Answer: PLU<|im_end|>"]


def test_thinking_masks_reasoning_and_answer(tokenizer_dir: Path) -> None:
    _, runs = _masked(
        tokenizer_dir,
        {
            "messages": [
                {"role": "user", "content": "Code of plum?"},
                {"role": "assistant", "content": "Answer: PLU", "reasoning_content": "First three letters."},
            ]
        },
    )
    assert runs == ["<think>\nFirst three letters.\n</think>\n\nAnswer: PLU<|im_end|>"]


def test_multi_turn_drops_earlier_reasoning_and_masks_every_reply(tokenizer_dir: Path) -> None:
    text, runs = _masked(
        tokenizer_dir,
        {
            "messages": [
                {"role": "user", "content": "Add 1 and 2."},
                {"role": "assistant", "content": "Answer: 3", "reasoning_content": "1 plus 2 is 3."},
                {"role": "user", "content": "Add 2 and 2."},
                {"role": "assistant", "content": "Answer: 4", "reasoning_content": "2 plus 2 is 4."},
            ]
        },
    )
    assert "1 plus 2 is 3." not in text
    assert runs == ["Answer: 3<|im_end|>", "<think>\n2 plus 2 is 4.\n</think>\n\nAnswer: 4<|im_end|>"]


def test_tool_calls_masked_tool_results_not(tokenizer_dir: Path) -> None:
    text, runs = _masked(
        tokenizer_dir,
        {
            "tools": [{"type": "function", "function": {"name": "lookup_code"}}],
            "messages": [
                {"role": "user", "content": "Use the tool for plum."},
                {"role": "assistant", "content": None, "tool_calls": [CALL], "reasoning_content": "Call it."},
                {"role": "tool", "content": "PLU"},
                {"role": "assistant", "content": "Answer: PLU", "reasoning_content": "It said PLU."},
            ],
        },
    )
    call = '<tool_call>\n{"name": "lookup_code", "arguments": {"word": "plum"}}\n</tool_call>'
    assert runs == [
        f"<think>\nCall it.\n</think>\n\n{call}<|im_end|>",
        "<think>\nIt said PLU.\n</think>\n\nAnswer: PLU<|im_end|>",
    ]
    assert "<|im_start|>tool\nPLU<|im_end|>\n" in text
    assert text.startswith("<|im_start|>system\n# Tools")


def test_matches_hf_apply_chat_template_with_assistant_masks(corpus: Path, tokenizer_dir: Path) -> None:
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    encoder = make_encoder(tokenizer_dir)
    records = [json.loads(line) for line in (corpus / "sft" / "train.jsonl").read_text().splitlines()[:200]]
    styles = set()
    for i, record in enumerate(records):
        conversation = parse_conversation(record, "train.jsonl", i + 1, True)
        text, spans = render(conversation)
        kwargs = {"tools": record.get("tools"), "enable_thinking": conversation.enable_thinking}
        assert text == hf.apply_chat_template(record["messages"], tokenize=False, **kwargs)
        reference = hf.apply_chat_template(
            record["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kwargs
        )
        ids, mask = encode_rendered(encoder, [(text, spans)])[0]
        assert ids.tolist() == reference["input_ids"] and mask.tolist() == reference["assistant_masks"]
        styles.add(
            (
                conversation.enable_thinking,
                "tools" in record,
                sum(m["role"] == "user" for m in record["messages"]) > 1,
            )
        )
    assert {(False, False, False), (True, False, False), (True, True, False), (False, False, True)} <= styles


def test_generation_prompt_by_mode() -> None:
    messages = [{"role": "user", "content": "hi"}]
    thinking, _ = render(
        parse_conversation({"messages": messages, "enable_thinking": True}, "t", 1, False), True
    )
    plain, _ = render(
        parse_conversation({"messages": messages, "enable_thinking": False}, "t", 1, False), True
    )
    assert thinking.endswith("<|im_start|>assistant\n")
    assert plain.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_leading_think_block_in_content_becomes_reasoning() -> None:
    conversation = parse_conversation(
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "<think>\nwhy\n</think>\n\nAnswer: 1"},
            ]
        },
        "t",
        1,
        True,
    )
    assert conversation.messages[1] == {
        "role": "assistant",
        "content": "Answer: 1",
        "reasoning_content": "why",
    }
    assert conversation.enable_thinking


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([{"role": "robot", "content": "x"}], "unknown_role"),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a</think> b"}],
            "unbalanced_think",
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>a"}],
            "unbalanced_think",
        ),
        (
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a", "reasoning_content": "<think>r</think>"},
            ],
            "unbalanced_think",
        ),
        ([{"role": "user", "content": "q"}], "no_assistant"),
        ([{"role": "user", "content": ["parts"]}, {"role": "assistant", "content": "a"}], "bad_messages"),
        (
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]},
            ],
            "bad_messages",
        ),
        ([], "bad_messages"),
    ],
)
def test_invalid_conversations(messages: list[Any], reason: str) -> None:
    with pytest.raises(BadRecord) as error:
        parse_conversation({"messages": messages}, "chat.jsonl", 7, True)
    assert error.value.reason == reason and str(error.value).startswith(f"{reason} (chat.jsonl:7): ")
