"""Seeded synthetic post-training sets built around one templated task a tiny model can learn.

The task family is closed and deterministic, so a few-million-parameter model can reach >= 90%
exact match on the answer line ``Answer: X``:

* ``code``  - "What is the capital-letter code of apple?" -> ``Answer: APP`` (first three letters)
* ``upper`` - "Write apple in capital letters."           -> ``Answer: APPLE``
* ``add``   - "What is 3 plus 4?"                          -> ``Answer: 7`` (single digits)

SFT mixes non-thinking, thinking (``reasoning_content``), multi-turn and tool-call conversations;
DPO pairs a correct answer (chosen) with one that breaks the rule (rejected); RL asks arithmetic
and letter-counting word problems with numeric reference answers for the ``math`` verifier.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

WORDS = (
    "apple", "banana", "cherry", "grape", "lemon", "mango", "melon", "peach",
    "plum", "olive", "tiger", "zebra", "horse", "camel", "otter", "panda",
    "raven", "eagle", "amber", "coral", "ivory", "lilac", "azure", "violet",
)  # fmt: skip
SYSTEM_PROMPT = "You are a precise assistant. End every answer with a line 'Answer: X'."
CODE_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup_code",
        "description": "Return the capital-letter code of a word.",
        "parameters": {
            "type": "object",
            "properties": {"word": {"type": "string"}},
            "required": ["word"],
        },
    },
}
_QUESTIONS = {
    "code": (
        "What is the capital-letter code of {x}?",
        "Give the capital-letter code of {x}.",
        "Code of {x}?",
    ),
    "upper": ("Write {x} in capital letters.", "What is {x} in upper case?", "Uppercase {x}."),
    "add": ("What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}."),
}


def _task(rng: random.Random) -> tuple[str, str, str, str]:
    """``(kind, question, reasoning, answer)`` for one random task instance."""
    kind = rng.choice(("code", "upper", "add"))
    template = rng.choice(_QUESTIONS[kind])
    if kind == "add":
        a, b = rng.randrange(10), rng.randrange(10)
        return kind, template.format(a=a, b=b), f"{a} plus {b} equals {a + b}.", str(a + b)
    word = rng.choice(WORDS)
    if kind == "code":
        letters = ", ".join(word[:3])
        reasoning = f"The first three letters of {word} are {letters}. In capitals: {word[:3].upper()}."
        return kind, template.format(x=word), reasoning, word[:3].upper()
    return (
        kind,
        template.format(x=word),
        f"Each letter of {word} in capitals gives {word.upper()}.",
        word.upper(),
    )


def _assistant(answer: str, reasoning: str | None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": f"Answer: {answer}"}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return message


def sft_example(rng: random.Random) -> dict[str, Any]:
    """One conversation: 40% plain, 30% thinking, 15% two-turn, 15% tool call."""
    style = rng.choices(("plain", "thinking", "multi_turn", "tool"), weights=(40, 30, 15, 15))[0]
    thinking = style == "thinking" or (style != "plain" and rng.random() < 0.5)
    messages: list[dict[str, Any]] = (
        [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.5 else []
    )
    record: dict[str, Any] = {"messages": messages}
    if style == "tool":
        word = rng.choice(WORDS)
        call = {"type": "function", "function": {"name": "lookup_code", "arguments": {"word": word}}}
        first: dict[str, Any] = {"role": "assistant", "content": "", "tool_calls": [call]}
        if thinking:
            first["reasoning_content"] = f"I should look up the code of {word} with the tool."
        messages += [
            {"role": "user", "content": f"Use the tool to find the capital-letter code of {word}."},
            first,
            {"role": "tool", "content": word[:3].upper()},
            _assistant(word[:3].upper(), f"The tool returned {word[:3].upper()}." if thinking else None),
        ]
        record["tools"] = [CODE_TOOL]
        record["task"] = "code"
    else:
        for _ in range(2 if style == "multi_turn" else 1):
            kind, question, reasoning, answer = _task(rng)
            messages += [
                {"role": "user", "content": question},
                _assistant(answer, reasoning if thinking else None),
            ]
            record["task"] = kind
    record["enable_thinking"] = thinking
    return record


def dpo_example(rng: random.Random) -> dict[str, Any]:
    """Chosen: correct ``Answer: X``. Rejected: wrong value, lower case, or no answer line."""
    kind, question, _, answer = _task(rng)
    flaw = rng.choice(("wrong", "case", "format"))
    if flaw == "wrong":
        rejected = str(int(answer) + rng.choice((-2, -1, 1, 2))) if kind == "add" else answer[::-1]
        rejected = f"Answer: {rejected}" if rejected != answer else f"Answer: {answer}!"
    elif flaw == "case":
        rejected = f"Answer: {answer.lower()}" if kind != "add" else f"answer: {answer}"
    else:
        rejected = answer
    return {"prompt": question, "chosen": f"Answer: {answer}", "rejected": rejected, "task": kind}


_NAMES = ("Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Lina", "Ravi")
_ITEMS = ("apples", "marbles", "stickers", "books", "shells", "coins")


def rl_example(rng: random.Random, index: int) -> dict[str, Any]:
    """An arithmetic (domain ``math``) or letter-counting (domain ``counting``) word problem."""
    if rng.random() < 0.7:
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        a, b = rng.randrange(2, 20), rng.randrange(1, 10)
        op = rng.choice(("gains", "loses", "times"))
        if op == "gains":
            prompt, answer = (
                f"{name} has {a} {item} and finds {b} more. How many {item} does {name} have now?",
                a + b,
            )
        elif op == "loses":
            a += b
            prompt, answer = f"{name} has {a} {item} and gives away {b}. How many {item} are left?", a - b
        else:
            prompt, answer = (
                f"{name} buys {b} bags with {a} {item} in each. How many {item} is that in total?",
                a * b,
            )
        domain = "math"
    else:
        word = rng.choice(WORDS)
        prompt, answer, domain = f"How many letters are in the word {word}?", len(word), "counting"
    prompt += " Give the final answer as 'Answer: N'."
    return {
        "id": f"rl-{index:05d}",
        "prompt": prompt,
        "answer": str(answer),
        "verifier": "math",
        "domain": domain,
    }


def _write(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def write_synthetic_sets(output: Path, seed: int = 1234) -> list[Path]:
    """``sft/{train,eval}.jsonl``, ``dpo/{train,eval}.jsonl``, ``rl/{train,eval}.jsonl``."""
    rng = random.Random(seed)
    return [
        _write(output / "sft" / "train.jsonl", [sft_example(rng) for _ in range(3000)]),
        _write(output / "sft" / "eval.jsonl", [sft_example(rng) for _ in range(200)]),
        _write(output / "dpo" / "train.jsonl", [dpo_example(rng) for _ in range(1000)]),
        _write(output / "dpo" / "eval.jsonl", [dpo_example(rng) for _ in range(100)]),
        _write(output / "rl" / "train.jsonl", [rl_example(rng, i) for i in range(500)]),
        _write(output / "rl" / "eval.jsonl", [rl_example(rng, 500 + i) for i in range(100)]),
    ]
