"""RL rollout + train throughput: asynchronous rollouts (``rl.async_rollout``) vs synchronous.

Both runs train the same tiny recipe (``recipes/rl/tiny_cpu.yaml``) in this process from the same
random initial weights for the same number of steps, with every trajectory trained (zero-variance
filtering off, so both modes do identical work per step). Synchronous: each step generates its
rollout, then trains on it. Asynchronous: the rollout engine generates step k + 1 on a background
thread while the trainer trains on step k. Throughput counts every trajectory token (prompt +
response) that was generated and trained, per second of the training loop.

Usage: ``python benchmarks/rl_async.py [--steps 12] [--threads 1]`` (builds the demo data under a
temporary directory when ``runs/demo/data`` is absent).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)

import torch  # noqa: E402


def demo_data(scratch: Path) -> Path:
    data = REPO / "runs" / "demo" / "data"
    if (data / "rl" / "train.jsonl").is_file() and (data / "tokenizer" / "tokenizer.json").is_file():
        return data
    from data_prep.demo import build_demo

    build_demo(scratch / "data", progress=False)
    return scratch / "data"


def run(mode: str, data: Path, scratch: Path, steps: int) -> tuple[float, float, float]:
    """(seconds, trajectory tokens, mean reward) of ``steps`` RL steps in ``mode`` (sync | async)."""
    from joyai_megatron.config.recipe import load_recipe
    from joyai_megatron.stages.rl import RLStage
    from joyai_megatron.training.distributed import shutdown
    from joyai_megatron.training.trainer import Trainer

    overrides = [
        f"data.tokenizer={data / 'tokenizer'}",
        f"data.rl_path={data / 'rl' / 'train.jsonl'}",
        f"data.cache_dir={scratch / 'cache'}",
        f"checkpoint.dir={scratch / mode / 'ckpt'}",
        "checkpoint.load=null",
        f"logging.dir={scratch / mode / 'logs'}",
        "logging.tensorboard=false",
        "logging.interval=1000",
        f"train.train_iters={steps}",
        "rl.prompts_per_step=8",
        "train.global_batch_size=64",
        "rl.steps_per_rollout=1",
        "rl.filter_zero_variance=false",
        "rl.eval_interval=0",
        f"rl.async_rollout={'true' if mode == 'async' else 'false'}",
    ]
    recipe = load_recipe(str(REPO / "recipes" / "rl" / "tiny_cpu.yaml"), overrides)
    trainer = Trainer(recipe, RLStage)
    prompts = trainer.stage.prompts
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    shutdown()
    history = [h for h in result["history"] if "stage/response_length" in h]
    per_rollout = recipe.rl.prompts_per_step * recipe.rl.group_size
    prompt_len = sum(len(p.token_ids) for p in prompts) / len(prompts)
    tokens = sum(per_rollout * (prompt_len + h["stage/response_length"]) for h in history)
    reward = sum(h["stage/reward"] for h in history) / max(len(history), 1)
    timing = {
        k.split("/")[-1]: round(sum(h.get(k, 0.0) for h in history) / max(len(history), 1), 2)
        for k in ("stage/time/generate_s", "stage/time/rollout_wait_s", "stage/time/old_logprob_s")
    }
    print(f"{mode:>5}: mean seconds per step {timing}", flush=True)
    return seconds, tokens, reward


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both modes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="rl_async_") as tmp:
        scratch = Path(tmp)
        data = demo_data(scratch)
        results = {}
        for mode in ("sync", "async"):
            seconds, tokens, reward = run(mode, data, scratch, args.steps)
            results[mode] = {
                "seconds": seconds,
                "tokens": tokens,
                "tokens_per_s": tokens / seconds,
                "reward": reward,
            }
            print(
                f"{mode:>5}: {args.steps} steps in {seconds:.1f} s, {tokens / seconds:,.0f} rollout+train tokens/s"
            )
    ratio = results["async"]["tokens_per_s"] / results["sync"]["tokens_per_s"]
    print(f"async / sync throughput: {ratio:.2f}x")
    print(json.dumps({**results, "ratio": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
