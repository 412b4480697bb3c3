"""``data_prep agentic-demo``: the toy tool-use task of agentic RL, generated from a seed (no downloads).

Task: a modular product of two 2-digit numbers ("What is 37 * 86 % 29?"; modulus 29). The tiny CPU
model cannot compute it in its head (a guess is right 1 time in 29); with the ``calculator`` tool
it only has to copy the operands into a call and the tool's result into "Answer: N". Operands are
2-digit numbers above 29 that the tokenizer keeps as one token (36 of them: 1,260 ordered pairs),
and results (0..28) are single tokens that never occur as operands: the result to copy is the one
number below 29 in the context. Everything is deterministic in ``seed``:

* ``corpus/``, ``tokenizer/``: the demo tokenizer (``data_prep demo``'s, with the <tool_call> tokens).
* ``sft/train.parquet``: the warm start. ``explicit_examples`` tool-use demonstrations of prompts
  that ask for the calculator ("Use the calculator: what is ...?"; user -> assistant tool call ->
  tool result -> assistant "Answer: N"; one problem per conversation), which teach the format
  and the copying, and
  ``sft_examples`` demonstrations of the task's own prompts ("What is ...?"), ``tool_share`` of
  them with the tool and the rest answered "in the head" (the right number, which the model cannot
  learn to compute). On the task's prompts the warm start therefore calls the tool only sometimes
  (greedy: rarely): RL has to discover that calling it pays.
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


MODULUS = 29


def single_token_numbers(tokenizer: Path) -> list[int]:
    """2-digit numbers the tokenizer encodes as one token (operands); every result must be one too."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    single = [n for n in range(100) if len(tok.encode(str(n), add_special_tokens=False).ids) == 1]
    if any(n not in single for n in range(MODULUS)):
        raise ValueError(f"{tokenizer}: results 0..{MODULUS - 1} are not all single tokens")
    return [n for n in single if n > MODULUS]


def result(a: int, b: int) -> int:
    return a * b % MODULUS


def expression(a: int, b: int) -> str:
    return f"{a} * {b} % {MODULUS}"


def question(a: int, b: int, explicit: bool = False) -> str:
    return f"{'Use the calculator: what' if explicit else 'What'} is {expression(a, b)}?"


def tool_turns(a: int, b: int, explicit: bool = False) -> list[dict[str, Any]]:
    call = {
        "type": "function",
        "function": {"name": "calculator", "arguments": {"expression": expression(a, b)}},
    }
    return [
        {"role": "user", "content": question(a, b, explicit)},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": str(result(a, b))},
        {"role": "assistant", "content": f"Answer: {result(a, b)}"},
    ]


def tool_demo(a: int, b: int, explicit: bool = False) -> list[dict[str, Any]]:
    return [{"role": "system", "content": SYSTEM}, *tool_turns(a, b, explicit)]


def chain_demo(pairs: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Several explicit problems in one conversation (one tool call each): more copies per token."""
    return [{"role": "system", "content": SYSTEM}] + [m for a, b in pairs for m in tool_turns(a, b, True)]


def direct_demo(a: int, b: int) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": question(a, b)},
        {"role": "assistant", "content": f"Answer: {result(a, b)}"},
    ]


def split_problems(
    seed: int, counts: dict[str, int], operands: list[int]
) -> dict[str, list[tuple[int, int]]]:
    """Disjoint problem sets of the given sizes: ordered pairs of distinct operands (never equal to
    the modulus or to any result)."""
    pairs = [(a, b) for a in operands for b in operands if a != b]
    if sum(counts.values()) > len(pairs):
        raise ValueError(f"{sum(counts.values())} problems from {len(pairs)} operand pairs: too many")
    random.Random(seed).shuffle(pairs)
    out: dict[str, list[tuple[int, int]]] = {}
    start = 0
    for name, count in counts.items():
        out[name], start = pairs[start : start + count], start + count
    return out


def write_raw(
    output: Path,
    seed: int,
    sft_examples: int,
    tool_share: float,
    rl_prompts: int,
    eval_prompts: int,
    operands: list[int],
    explicit_examples: int,
    chain: int = 1,
) -> None:
    counts = {"explicit": explicit_examples, "sft": sft_examples, "rl": rl_prompts, "eval": eval_prompts}
    sets = split_problems(seed, counts, operands)
    rng = random.Random(seed + 1)
    raw = output / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    explicit = sets["explicit"]
    demos = [chain_demo(explicit[k : k + chain]) for k in range(0, len(explicit), chain)]
    demos += [tool_demo(a, b) if rng.random() < tool_share else direct_demo(a, b) for a, b in sets["sft"]]
    rng.shuffle(demos)
    with open(raw / "sft.jsonl", "w") as f:
        for messages in demos:
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
                    "answer": str(result(a, b)),
                    "verifier": "math",
                    "domain": "arithmetic",
                    "enable_thinking": False,
                }
                f.write(json.dumps(record) + "\n")


def build_agentic_demo(
    output: Path,
    seed: int = 1234,
    sft_examples: int = 200,
    tool_share: float = 0.4,
    explicit_examples: int = 600,
    rl_prompts: int = 200,
    eval_prompts: int = 64,
    seq_length: int = 512,
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
    write_raw(
        output,
        seed,
        sft_examples,
        tool_share,
        rl_prompts,
        eval_prompts,
        single_token_numbers(tokenizer),
        explicit_examples,
    )
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
