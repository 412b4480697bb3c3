"""``data_prep rl``: prompts with reference answers (or tests) -> rendered, tokenized RL prompts.

Input records: ``prompt`` (string, one user turn) or ``messages`` (ending before the reply),
``answer`` and/or ``tests``, optional ``verifier``, ``domain``, ``id``, ``enable_thinking``, and
for agentic (multi-turn) RL ``tools``: OpenAI function schemas, or names of registered tools
(``calculator``, ``python``: rl/agentic/tools.py) that are expanded into their schemas.
Output JSONL, one object per prompt:
``{"id", "prompt", "prompt_ids", "answer", "tests", "verifier", "domain", "enable_thinking", "tools"}``
where ``prompt`` is the chat-template rendering (tools listed in the system turn) with the
generation prompt appended, ``prompt_ids`` its token ids, and ``tools`` the tool names the
episode's environment may execute (null for single-turn prompts).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from data_prep.chat import Conversation, parse_messages, parse_tools, render
from data_prep.errors import BadRecord, ErrorPolicy, OnError, OutputLimits
from data_prep.pretrain import expand_inputs
from data_prep.readers import iter_records
from data_prep.storage import OutputSet, write_json
from data_prep.tokenizer import Engine, encode_each, make_encoder


@dataclass(frozen=True)
class RLPrompt:
    """One line of a ``data_prep rl`` output file."""

    id: str
    prompt: str
    prompt_ids: list[int]
    answer: str | None
    tests: list[Any] | None
    verifier: str
    domain: str
    enable_thinking: bool
    tools: list[str] | None = None


def _field(record: dict[str, Any], key: str, default: str | None, path: str, line: int) -> str:
    value = record.get(key, default)
    if value is None:
        raise BadRecord(path, line, "missing_key", f"no key {key!r} and no --default-{key}")
    if not isinstance(value, str) or not value:
        raise BadRecord(path, line, "not_string", f"{key!r} must be a non-empty string")
    return value


def _conversation(record: dict[str, Any], path: str, line: int, thinking: bool) -> Conversation:
    if "messages" in record:
        messages = parse_messages(record["messages"], path, line)
    elif "prompt" in record:
        if not isinstance(record["prompt"], str) or not record["prompt"].strip():
            raise BadRecord(path, line, "not_string", "'prompt' must be a non-empty string")
        messages = parse_messages([{"role": "user", "content": record["prompt"]}], path, line)
    else:
        raise BadRecord(path, line, "missing_key", "no key 'prompt' or 'messages'")
    if messages[-1]["role"] == "assistant":
        raise BadRecord(path, line, "bad_messages", "an RL prompt must not end with an assistant message")
    enable = record.get("enable_thinking", thinking)
    if not isinstance(enable, bool):
        raise BadRecord(path, line, "bad_messages", "'enable_thinking' must be true or false")
    return Conversation(messages, parse_tools(record.get("tools"), path, line), enable)


def _tool_names(conversation: Conversation) -> list[str] | None:
    if not conversation.tools:
        return None
    return [t.get("function", t).get("name") for t in conversation.tools]


def prepare_rl(
    inputs: list[str],
    tokenizer: str,
    output: str,
    default_verifier: str | None = None,
    default_domain: str | None = None,
    enable_thinking: bool = True,
    on_error: OnError = "fail",
    engine: Engine = "auto",
    limits: OutputLimits | None = None,
) -> dict[str, Any]:
    """Render and tokenize every prompt; writes ``output`` (JSONL) and its ``.stats.json``.

    Repeated ids (rollout groups and replay are keyed by id) and verifiers no reward is registered
    under (``rl.reward: prompt`` would fail on them mid-run) are counted as named warnings.
    """
    policy = ErrorPolicy(on_error, limits)
    encoder = make_encoder(tokenizer, engine)
    prompts: list[dict[str, Any]] = []
    records = 0
    for path in expand_inputs(inputs):
        for line, record in iter_records(path, policy):
            records += 1
            try:
                conversation = _conversation(record, path, line, enable_thinking)
                answer, tests = record.get("answer"), record.get("tests")
                if answer is None and not tests:
                    raise BadRecord(path, line, "missing_key", "needs 'answer' or 'tests'")
                if answer is not None and not isinstance(answer, str | int | float):
                    raise BadRecord(path, line, "not_string", "'answer' must be a string or number")
                text, _ = render(conversation, add_generation_prompt=True)
                ident = record.get("id") or hashlib.sha1(text.encode()).hexdigest()[:16]
                prompts.append(
                    {
                        "id": str(ident),
                        "prompt": text,
                        "answer": None if answer is None else str(answer),
                        "tests": tests,
                        "verifier": _field(record, "verifier", default_verifier, path, line),
                        "domain": _field(record, "domain", default_domain, path, line),
                        "enable_thinking": conversation.enable_thinking,
                        "tools": _tool_names(conversation),
                    }
                )
            except BadRecord as err:
                policy.handle(err)
    policy.check_outcome(len(prompts), "prompts", output)
    _semantic_warnings(prompts, policy)
    for prompt, ids in zip(prompts, encode_each(encoder, [p["prompt"] for p in prompts]), strict=True):
        prompt["prompt_ids"] = ids.tolist()
    domains: dict[str, int] = {}
    for prompt in prompts:
        domains[prompt["domain"]] = domains.get(prompt["domain"], 0) + 1
    stats = {
        "output": output,
        "records": records,
        "prompts": len(prompts),
        "domains": dict(sorted(domains.items())),
        "skipped": dict(sorted(policy.skipped.items())),
        "warnings": dict(sorted(policy.warnings.items())),
        "engine": encoder.name,
    }
    with OutputSet() as out:
        with open(out.stage(output), "w", encoding="utf-8") as f:
            for prompt in prompts:
                f.write(json.dumps(asdict(RLPrompt(**prompt)), ensure_ascii=False) + "\n")
        write_json(out.stage(f"{output}.stats.json"), stats)
    return stats


def _semantic_warnings(prompts: list[dict[str, Any]], policy: ErrorPolicy) -> None:
    from joyai_megatron.rl.rewards import available_rewards

    duplicates = sum(n - 1 for n in Counter(p["id"] for p in prompts).values())
    if duplicates:
        policy.warn("duplicate_id", duplicates)
    known = set(available_rewards())
    for name, n in Counter(p["verifier"] for p in prompts if p["verifier"] not in known).items():
        policy.warn(f"unknown_verifier:{name}", n)


def read_rl_prompts(path: str | Path) -> list[RLPrompt]:
    """Load a ``data_prep rl`` output file."""
    with open(path, encoding="utf-8") as f:
        return [RLPrompt(**json.loads(line)) for line in f if line.strip()]
