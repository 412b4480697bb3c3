"""Agentic RL on the toy calculator task, end to end on CPU: data, SFT warm start, FiberPO.

    OMP_NUM_THREADS=1 python benchmarks/rl_agentic.py [--root runs/agentic] [--rl-steps 20] [rl overrides ...]

Builds ``data_prep agentic-demo`` under ROOT/data, runs recipes/sft/tiny_cpu_agentic.yaml, then
recipes/rl/tiny_cpu_agentic.yaml, and prints the greedy held-out evaluation (pass@1: episodes
answered correctly; tool_use: episodes that called a tool with no failed call) of the warm start
(before RL step 1) and after RL, with the difference in points. docs/rl.md section 11 has the numbers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str]) -> float:
    start = time.time()
    subprocess.run([sys.executable, *args], cwd=REPO, check=True)
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default="runs/agentic")
    parser.add_argument("--rl-steps", type=int, default=20)
    parser.add_argument("--skip-sft", action="store_true", help="reuse ROOT/sft/checkpoints")
    args, extra = parser.parse_known_args()
    root = Path(args.root)
    data = root / "data"
    common = [f"data.tokenizer={data / 'tokenizer'}", f"data.cache_dir={data / 'cache'}"]
    times = {}
    if not args.skip_sft:
        times["data_s"] = _run(["-m", "data_prep", "agentic-demo", "--output", str(data)])
        times["sft_s"] = _run(
            ["-m", "joyai_megatron", "sft", "recipes/sft/tiny_cpu_agentic.yaml", *common,
             f"data.sft_path={data / 'sft' / 'train.parquet'}", f"checkpoint.dir={root / 'sft' / 'checkpoints'}",
             f"logging.dir={root / 'sft' / 'logs'}"]
        )  # fmt: skip
    rl_logs = root / "rl" / "logs"
    times["rl_s"] = _run(
        ["-m", "joyai_megatron", "rl", "recipes/rl/tiny_cpu_agentic.yaml", *common,
         f"data.rl_path={data / 'rl' / 'train.jsonl'}", f"rl.eval_path={data / 'rl' / 'eval.jsonl'}",
         f"checkpoint.load={root / 'sft' / 'checkpoints'}", f"checkpoint.dir={root / 'rl' / 'checkpoints'}",
         f"logging.dir={rl_logs}", f"train.train_iters={args.rl_steps}", *extra]
    )  # fmt: skip
    rows = [json.loads(line) for line in (rl_logs / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "stage/eval/pass@1" in r]
    first, last = evals[0], evals[-1]
    report = {
        "eval_steps": [r["stage/eval/at_step"] for r in evals],
        "eval_pass@1": [r["stage/eval/pass@1"] for r in evals],
        "eval_tool_use": [r["stage/eval/tool_use"] for r in evals],
        "pass@1_gain_points": 100 * (last["stage/eval/pass@1"] - first["stage/eval/pass@1"]),
        "tool_use_gain_points": 100 * (last["stage/eval/tool_use"] - first["stage/eval/tool_use"]),
        **{k: round(v, 1) for k, v in times.items()},
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
