"""Build the shipped task data (``tasks/*.jsonl``) from ``data_prep demo`` output.

    python -m joyai_megatron.evaluation.build_tasks --data runs/demo/data

The JSONL files are committed, so evaluation needs neither the hub nor a demo run; this is how
they were made (and how to remake them after the demo data changes).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from joyai_megatron.evaluation.tasks.utils import TASK_DIR

CHOICE_TASKS = ("upper", "add")


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def choice_docs(sft_eval: Path, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Single-turn records of the short-answer tasks: the answer against three from other questions."""
    records = [
        r
        for r in _read(sft_eval)
        if r.get("task") in CHOICE_TASKS
        and not r.get("tools")
        and [m["role"] for m in r["messages"]][-2:] == ["user", "assistant"]
    ]
    rng = random.Random(seed)
    docs = []
    for record in records[:n]:
        answer = record["messages"][-1]["content"].strip()
        others = sorted(
            {r["messages"][-1]["content"].strip() for r in records if r["task"] == record["task"]} - {answer}
        )
        choices = [answer, *rng.sample(others, 3)]
        rng.shuffle(choices)
        docs.append(
            {
                "question": record["messages"][-2]["content"],
                "choices": choices,
                "gold": choices.index(answer),
                "task": record["task"],
            }
        )
    return docs


def math_docs(rl_eval: Path, n: int) -> list[dict[str, Any]]:
    return [{"prompt": r["prompt"], "answer": r["answer"], "domain": r["domain"]} for r in _read(rl_eval)[:n]]


def heldout_docs(n: int, max_chars: int) -> list[dict[str, str]]:
    """Docstring documents (the demo corpus's format) of ``idlelib``, a package the corpus skips."""
    import sysconfig

    from data_prep.corpus import _module_document

    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted((root / "idlelib").glob("*.py")):
        text = _module_document(path, ".".join(path.relative_to(root).with_suffix("").parts))
        if text:
            docs.append({"text": text[:max_chars]})
    return docs[:n]


def build(data: Path, out: Path = TASK_DIR) -> dict[str, int]:
    corpus = data / "corpus"
    sets = {
        "joyai_demo_choice": choice_docs(corpus / "sft" / "eval.jsonl", 40),
        "joyai_demo_math": math_docs(corpus / "rl" / "eval.jsonl", 50),
        "joyai_demo_heldout": heldout_docs(20, 1500),
    }
    for name, docs in sets.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    return {name: len(docs) for name, docs in sets.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("runs/demo/data"), help="data_prep demo output")
    args = parser.parse_args(argv)
    print(json.dumps(build(args.data)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
