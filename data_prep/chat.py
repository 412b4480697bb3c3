"""OpenAI-style ``messages`` -> validated conversation -> rendered text + assistant-token mask.

The template (``chat_template.jinja``) is the one HF ``apply_chat_template`` runs too; here it is
rendered with Jinja2 the same way (sandboxed, ``trim_blocks``/``lstrip_blocks``, a ``tojson`` that
keeps non-ASCII), and ``{% generation %}`` blocks become character spans. Text is then tokenized
span by span, so every assistant reply starts on a token boundary exactly as it does when the model
generates after the prompt, and the mask is exact by construction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from data_prep.errors import BadRecord
from data_prep.tokenizer import Encoder

TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")
ROLES = ("system", "user", "assistant", "tool")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# Private-use characters that bracket generation blocks while rendering; refused in input text.
_GEN_START, _GEN_END = "\ue000", "\ue001"


class _GenerationMarks(Extension):
    """``{% generation %}...{% endgeneration %}``: bracket the body with sentinel characters."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller: Any) -> str:
        return _GEN_START + caller() + _GEN_END


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, sort_keys: bool = False
) -> str:
    # Same output as transformers' chat-template ``tojson`` (plain json.dumps, no HTML escaping).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise ValueError(message)


@cache
def _template(path: Path = TEMPLATE_PATH) -> Any:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationMarks, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    return env.from_string(path.read_text())


@dataclass
class Conversation:
    """A validated conversation, ready to render."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    enable_thinking: bool = False


def _split_think(content: str, path: str, line: int, index: int) -> tuple[str, str | None]:
    """A leading ``<think>...</think>`` block moves to reasoning; any other think tag is an error."""
    reasoning = None
    if (
        content.lstrip().startswith(THINK_OPEN)
        and content.count(THINK_OPEN) == 1
        and content.count(THINK_CLOSE) == 1
    ):
        head, _, content = content.partition(THINK_CLOSE)
        reasoning = head.lstrip()[len(THINK_OPEN) :].strip("\n")
        content = content.lstrip("\n")
    if THINK_OPEN in content or THINK_CLOSE in content:
        raise BadRecord(path, line, "unbalanced_think", f"messages[{index}].content has stray think tags")
    return content, reasoning


def _check_tool_calls(calls: Any, path: str, line: int, index: int) -> list[dict[str, Any]]:
    where = f"messages[{index}].tool_calls"
    if not isinstance(calls, list):
        raise BadRecord(path, line, "bad_messages", f"{where} must be a list")
    for k, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRecord(path, line, "bad_messages", f"{where}[{k}] needs function.name (a string)")
        if not isinstance(function.get("arguments"), dict | str):
            raise BadRecord(
                path, line, "bad_messages", f"{where}[{k}].function.arguments must be an object or string"
            )
    return calls


def _check_message(message: Any, path: str, line: int, index: int) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise BadRecord(
            path, line, "bad_messages", f"{where} is {type(message).__name__}, expected an object"
        )
    role = message.get("role")
    if role not in ROLES:
        raise BadRecord(path, line, "unknown_role", f"{where}.role is {role!r}, expected one of {ROLES}")
    content = message.get("content")
    calls = message.get("tool_calls")
    if content is None and role == "assistant" and calls:
        content = ""
    if not isinstance(content, str):
        raise BadRecord(
            path, line, "bad_messages", f"{where}.content is {type(content).__name__}, expected a string"
        )
    out: dict[str, Any] = {"role": role, "content": content}
    if role == "assistant":
        reasoning = message.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise BadRecord(path, line, "bad_messages", f"{where}.reasoning_content must be a string")
        content, embedded = _split_think(content, path, line, index)
        if reasoning and embedded is not None:
            raise BadRecord(
                path, line, "unbalanced_think", f"{where} has reasoning_content and a <think> block"
            )
        reasoning = reasoning if reasoning else embedded
        if reasoning and (THINK_OPEN in reasoning or THINK_CLOSE in reasoning):
            raise BadRecord(path, line, "unbalanced_think", f"{where}.reasoning_content contains think tags")
        out.update(content=content, reasoning_content=reasoning or None)
        if calls:
            out["tool_calls"] = _check_tool_calls(calls, path, line, index)
    texts = [out["content"], out.get("reasoning_content") or ""]
    if any(_GEN_START in t or _GEN_END in t for t in texts):
        raise BadRecord(path, line, "bad_messages", f"{where} contains reserved characters U+E000/U+E001")
    return out


def parse_messages(raw: Any, path: str, line: int, key: str = "messages") -> list[dict[str, Any]]:
    """Validate a list of OpenAI-style messages."""
    if not isinstance(raw, list) or not raw:
        raise BadRecord(path, line, "bad_messages", f"{key!r} must be a non-empty list of messages")
    return [_check_message(m, path, line, i) for i, m in enumerate(raw)]


def parse_tools(tools: Any, path: str, line: int) -> list[dict[str, Any]] | None:
    """The optional ``tools`` list (OpenAI function schemas, or names of the agentic RL tools
    registered in joyai_megatron/rl/agentic/tools.py, expanded into their schemas), rendered into
    the system turn."""
    if isinstance(tools, list) and any(isinstance(t, str) for t in tools):
        from joyai_megatron.rl.agentic.tools import available_tools, get_tool

        unknown = [t for t in tools if isinstance(t, str) and t not in available_tools()]
        if unknown:
            raise BadRecord(
                path, line, "bad_messages", f"unknown tool {unknown[0]!r}; registered: {available_tools()}"
            )
        tools = [get_tool(t).schema() if isinstance(t, str) else t for t in tools]
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise BadRecord(path, line, "bad_messages", "'tools' must be a list of objects or tool names")
    return tools or None


def parse_conversation(record: dict[str, Any], path: str, line: int, require_assistant: bool) -> Conversation:
    """A record's ``messages`` (+ optional ``tools``, ``enable_thinking``) as a Conversation."""
    if "messages" not in record:
        raise BadRecord(path, line, "missing_key", f"no key 'messages' (keys: {sorted(record)[:8]})")
    messages = parse_messages(record["messages"], path, line)
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise BadRecord(path, line, "no_assistant", "no assistant message to train on")
    tools = parse_tools(record.get("tools"), path, line)
    thinking = record.get("enable_thinking")
    if thinking is not None and not isinstance(thinking, bool):
        raise BadRecord(path, line, "bad_messages", "'enable_thinking' must be true or false")
    if thinking is None:
        thinking = any(m.get("reasoning_content") for m in messages)
    return Conversation(messages, tools, thinking)


def render(
    conversation: Conversation, add_generation_prompt: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """Rendered text and the ``[start, end)`` character spans of its generation blocks."""
    marked = _template().render(
        messages=conversation.messages,
        tools=conversation.tools,
        enable_thinking=conversation.enable_thinking,
        add_generation_prompt=add_generation_prompt,
    )
    pieces, spans, position = [], [], 0
    for k, chunk in enumerate(marked.split(_GEN_START)):
        inside, _, after = chunk.partition(_GEN_END) if k else ("", "", chunk)
        if k:
            spans.append((position, position + len(inside)))
        pieces.append(inside + after)
        position += len(inside) + len(after)
    return "".join(pieces), spans


def encode_rendered(
    encoder: Encoder, items: list[tuple[str, list[tuple[int, int]]]]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Token ids (int32) and 0/1 assistant masks (uint8), encoding each span separately."""
    segments: list[str] = []
    flags: list[int] = []
    counts: list[int] = []
    for text, spans in items:
        cut, before = 0, len(segments)
        for start, end in spans:
            if start > cut:
                segments.append(text[cut:start])
                flags.append(0)
            if end > start:
                segments.append(text[start:end])
                flags.append(1)
            cut = end
        if cut < len(text):
            segments.append(text[cut:])
            flags.append(0)
        counts.append(len(segments) - before)
    flat, lengths = encoder.encode_flat(segments)
    mask_flat = np.repeat(np.asarray(flags, dtype=np.uint8), lengths)
    ends = np.cumsum(lengths)
    out, first = [], 0
    for count in counts:
        lo = int(ends[first - 1]) if first else 0
        hi = int(ends[first + count - 1]) if count else lo
        out.append((flat[lo:hi].astype(np.int32), mask_flat[lo:hi]))
        first += count
    return out
