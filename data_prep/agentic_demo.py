"""``data_prep agentic-demo``: the toy tool-use task of agentic RL, generated from a seed (no downloads).

Task: multiply two 2-digit numbers ("What is 37 * 86?"). The tiny CPU model cannot
multiply in its head; with the ``calculator`` tool it only has to copy the operands into a call
and the tool's result into "Answer: N". Everything is deterministic in ``seed``:

* ``corpus/``, ``tokenizer/``: the demo tokenizer (``data_prep demo``'s, with the <tool_call> tokens).
* ``sft/train.parquet``: ``sft_examples`` warm-start conversations, ``tool_share`` of them tool-use
  demonstrations (user -> assistant tool call -> tool result -> assistant "Answer: N"), the rest
  answered "in the head" (the right number, which the model cannot learn to compute). The warm
  start therefore calls the tool only sometimes: RL has to discover that calling it pays.
* ``rl/train.jsonl``, ``rl/eval.jsonl``: environment prompts (``tools: ["calculator"]``, ``math``
  verifier); the eval problems are disjoint from every training and SFT problem (held out).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from data_prep.rl import prepare_rl
from data_prep.sft import prepare_sft

SYSTEM = "Use the calculator for arithmetic."


def problem(rng: random.Random) -> tuple[int, int]:
    return rng.randint(10, 99), rng.randint(10, 99)


def question(a: int, b: int) -> str:
    return f"What is {a} * {b}?"


def tool_demo(a: int, b: int) -> list[dict[str, Any]]:
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": f"{a} * {b}"}}}
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": question(a, b)},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": str(a * b)},
        {"role": "assistant", "content": f"Answer: {a * b}"},
    ]


def direct_demo(a: int, b: int) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": question(a, b)},
        {"role": "assistant", "content": f"Answer: {a * b}"},
    ]


def split_problems(seed: int, counts: dict[str, int]) -> dict[str, list[tuple[int, int]]]:
    """Disjoint problem sets (by operand pair) of the given sizes."""
    rng, seen = random.Random(seed), set()
    out: dict[str, list[tuple[int, int]]] = {}
    for name, count in counts.items():
        items = []
        while len(items) < count:
            pair = problem(rng)
            if pair not in seen:
                seen.add(pair)
                items.append(pair)
        out[name] = items
    return out


def write_raw(
    output: Path, seed: int, sft_examples: int, tool_share: float, rl_prompts: int, eval_prompts: int
) -> None:
    sets = split_problems(seed, {"sft": sft_examples, "rl": rl_prompts, "eval": eval_prompts})
    rng = random.Random(seed + 1)
    raw = output / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    with open(raw / "sft.jsonl", "w") as f:
        for a, b in sets["sft"]:
            messages = tool_demo(a, b) if rng.random() < tool_share else direct_demo(a, b)
            tools = ["calculator"]
            f.write(json.dumps({"messages": messages, "tools": tools, "enable_thinking": False}) + "\n")
    for split in ("rl", "eval"):
        with open(raw / f"{split}.jsonl", "w") as f:
            for k, (a, b) in enumerate(sets[split]):
                record = {
                    "id": f"{split}-{k}",
                    "messages": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": question(a, b)},
                    ],
                    "tools": ["calculator"],
                    "answer": str(a * b),
                    "verifier": "math",
                    "domain": "arithmetic",
                    "enable_thinking": False,
                }
                f.write(json.dumps(record) + "\n")


def build_agentic_demo(
    output: Path,
    seed: int = 1234,
    sft_examples: int = 800,
    tool_share: float = 0.4,
    rl_prompts: int = 512,
    eval_prompts: int = 100,
    seq_length: int = 256,
    tokenizer: Path | None = None,
) -> dict[str, Any]:
    """Build the tokenizer (unless given), the SFT warm-start set and the RL prompt sets."""
    from data_prep.demo import make_corpus
    from data_prep.train_tokenizer import DEFAULT_VOCAB_SIZE, train_tokenizer

    output.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = output / "tokenizer"
        if not (tokenizer / "tokenizer.json").is_file():
            make_corpus(output / "corpus")
            train_tokenizer([str(output / "corpus" / "**" / "*.jsonl")], tokenizer, DEFAULT_VOCAB_SIZE)
    write_raw(output, seed, sft_examples, tool_share, rl_prompts, eval_prompts)
    stats = {
        "sft": prepare_sft(
            [str(output / "raw" / "sft.jsonl")],
            str(tokenizer),
            str(output / "sft" / "train.parquet"),
            seq_length,
        ),
        "rl/train": prepare_rl(
            [str(output / "raw" / "rl.jsonl")], str(tokenizer), str(output / "rl" / "train.jsonl")
        ),
        "rl/eval": prepare_rl(
            [str(output / "raw" / "eval.jsonl")], str(tokenizer), str(output / "rl" / "eval.jsonl")
        ),
    }
    return {"tokenizer": str(tokenizer), **stats}
