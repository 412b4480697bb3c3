"""Exact-match scoring of an SFT checkpoint on held-out chat records (the demo's templated task).

For each record (``data_prep`` chat format: ``messages``, optional ``tools`` and
``enable_thinking``): render every message but the last with the chat template and its generation
prompt, tokenised exactly as ``data_prep sft`` tokenises training data, decode greedily to
``<|im_end|>``, drop the ``<think>...</think>`` block, and compare with the last message's content.

    python -m joyai_megatron.stages.sft_eval runs/demo/sft/checkpoints \
        --data runs/demo/data/corpus/sft/eval.jsonl [--limit 100] [--output results.jsonl]

Runs on one process (CPU, or one GPU with the ``local`` backend); a 48B model is scored after
export to Hugging Face with a serving engine instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from joyai_megatron.errors import UserError, cli_entry
from joyai_megatron.stages.generate import greedy_generate

THINK_CLOSE = "</think>"
END_OF_TURN = "<|im_end|>"


def read_records(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Chat records of a JSONL file whose last message is the assistant's reference answer."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            messages = record.get("messages") or []
            if not messages or messages[-1].get("role") != "assistant":
                raise ValueError(f"{path}:{line_no}: the last message must be the assistant's answer")
            records.append(record)
            if limit is not None and len(records) >= limit:
                break
    return records


def encode_prompts(records: list[dict[str, Any]], tokenizer: str) -> list[list[int]]:
    """Prompt token ids, split at generation spans exactly as ``data_prep sft`` encodes them."""
    from data_prep.chat import encode_rendered, parse_conversation, render
    from data_prep.tokenizer import make_encoder

    rendered = []
    for k, record in enumerate(records):
        prompt = {**record, "messages": record["messages"][:-1]}
        if prompt.get("enable_thinking") is None:  # infer from the answer, as training did
            prompt["enable_thinking"] = bool(record["messages"][-1].get("reasoning_content"))
        conversation = parse_conversation(prompt, "<eval>", k + 1, require_assistant=False)
        rendered.append(render(conversation, add_generation_prompt=True))
    return [ids.tolist() for ids, _ in encode_rendered(make_encoder(tokenizer, "hf"), rendered)]


def final_answer(text: str) -> str:
    """The reply without its reasoning block and surrounding whitespace."""
    if THINK_CLOSE in text:
        text = text.split(THINK_CLOSE, 1)[1]
    return text.strip()


def exact_match(
    model: torch.nn.Module,
    tokenizer: str,
    records: list[dict[str, Any]],
    max_new_tokens: int = 64,
    max_pack_tokens: int = 4096,
) -> dict[str, Any]:
    """Accuracy overall, per ``task`` and per mode (thinking or not), plus every record's result."""
    from joyai_megatron.training.tokenizer import HFTokenizer

    tok = HFTokenizer(tokenizer)
    stop = tok.token_to_id(END_OF_TURN)
    if stop is None:
        raise ValueError(f"{tokenizer}: no {END_OF_TURN} token; the chat template needs it")
    prompts = encode_prompts(records, tokenizer)
    started = time.time()
    generated = greedy_generate(model, prompts, max_new_tokens, {stop}, max_pack_tokens)
    results, groups = [], defaultdict(list)
    for record, ids in zip(records, generated, strict=True):
        text = tok.decode([t for t in ids if t != stop])
        expected = record["messages"][-1]["content"].strip()
        ok = final_answer(text) == expected and bool(ids) and ids[-1] == stop
        thinking = bool(record.get("enable_thinking", record["messages"][-1].get("reasoning_content")))
        results.append({"expected": expected, "generated": text, "correct": ok, "thinking": thinking})
        groups[f"task/{record.get('task', 'unknown')}"].append(ok)
        groups["mode/thinking" if thinking else "mode/plain"].append(ok)
    correct = sum(r["correct"] for r in results)
    return {
        "exact_match": correct / max(len(results), 1),
        "correct": correct,
        "n": len(results),
        "groups": {k: sum(v) / len(v) for k, v in sorted(groups.items())},
        "seconds": time.time() - started,
        "results": results,
    }


def load_checkpoint_model(checkpoint: str | Path) -> tuple[torch.nn.Module, Any]:
    """The checkpoint's model (fp32, ``local`` backend) on this process, and its saved recipe."""
    from joyai_megatron.training.checkpoint import resolve_checkpoint
    from joyai_megatron.training.checkpoint_model import rebuild_model

    loaded = rebuild_model(resolve_checkpoint(checkpoint))
    return loaded.model, loaded.recipe


@cli_entry
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m joyai_megatron.stages.sft_eval", description=__doc__)
    parser.add_argument("checkpoint", help="checkpoint root (its latest step) or one iter_* directory")
    parser.add_argument(
        "--data", required=True, help="chat records (JSONL), e.g. the demo's corpus/sft/eval.jsonl"
    )
    parser.add_argument(
        "--tokenizer", help="tokenizer directory (default: the checkpoint recipe's data.tokenizer)"
    )
    parser.add_argument("--limit", type=int, help="score only the first N records")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-pack-tokens", type=int, default=4096, help="tokens per forward call")
    parser.add_argument("--output", help="write every record's result here (JSONL)")
    args = parser.parse_args(argv)

    from joyai_megatron.training.distributed import shutdown

    records = read_records(args.data, args.limit)
    try:
        model, recipe = load_checkpoint_model(args.checkpoint)
        tokenizer = args.tokenizer or recipe.data.tokenizer
        if not tokenizer:
            raise UserError(
                "no tokenizer", f"{args.checkpoint}: recipe data.tokenizer", "the recipe names none", "pass --tokenizer"
            )
        report = exact_match(model, tokenizer, records, args.max_new_tokens, args.max_pack_tokens)
    finally:
        shutdown()
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            for row in report["results"]:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
