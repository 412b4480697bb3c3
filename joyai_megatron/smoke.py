"""``python -m joyai_megatron smoke RECIPE...``: a shipped recipe trains a few steps on one GPU.

A cluster recipe (`te` backend, its FP8 recipe, recompute, distributed optimizer, FP8 parameter
gather, async checkpoints) is run *as shipped* except for what one device cannot hold or does not
have: the depth (``--layers``, default 2: the dense layer and one MoE layer, at the real widths), the
layout (TP/PP/EP/CP = 1, so DP = 1; the GPU holds the experts one EP rank of the shipped layout
holds, e.g. 256 / EP 8 = 32), the sequence length (capped at ``--max-seq-length``), the batch
(``--global-batch`` rows) and the data (the bundled demo data, built here by ``data_prep demo``, the tool-use prompts of
``data_prep agentic-demo`` for agentic RL, and the demo tokenizer's vocabulary, ``--vocab-size``);
RL rolls out with the ``local`` engine (vLLM/SGLang are not installed on every GPU machine), and
a post-training stage starts from fresh weights rather than the previous stage's checkpoint.
Each recipe runs in its own process (a fresh CUDA context); the command exits 1 if any failed,
trained a non-finite loss, or wrote no checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from joyai_megatron.config.recipe import load_recipe, save_resolved_recipe
from joyai_megatron.config.schema import Recipe
from joyai_megatron.model.presets import recipe_arch

# The loss each stage logs: total (with MTP; DPO's), the LM part alone, RL's policy loss.
LOSS_KEYS = ("loss", "lm_loss", "policy_loss")


@dataclass(frozen=True)
class SmokeResult:
    recipe: str
    stage: str
    ok: bool
    seconds: float
    steps: int
    first_loss: float
    last_loss: float
    tokens_per_second: float
    error: str = ""


def one_device_overrides(recipe: Recipe, args: argparse.Namespace) -> list[str]:
    """Depth, layout, batch, length and evaluation for one device; the rest stays as shipped."""
    arch = recipe_arch(recipe)
    overrides = [
        f"model.arch.num_layers={args.layers}",
        # One GPU holds what one expert-parallel rank of the shipped layout holds.
        f"model.arch.num_experts={max(arch.num_experts // recipe.parallel.ep, arch.moe_router_topk)}",
        f"model.arch.vocab_size={args.vocab_size}",
        "parallel.tp=1",
        "parallel.pp=1",
        "parallel.ep=1",
        "parallel.etp=1",
        "parallel.cp=1",
        "parallel.vpp=null",
        "parallel.pp_layout=null",
        "parallel.sequence_parallel=false",
        f"train.global_batch_size={args.global_batch}",
        "train.micro_batch_size=1",
        "train.rampup_batch_size=null",
        f"train.train_iters={args.steps}",
        "train.train_tokens=null",
        f"train.eval_interval={args.steps}",  # one evaluation at the end (QAT's comparison needs it)
        "train.eval_iters=1",
        "scheduler.warmup_tokens=0",  # a 3-step run cannot warm up over 100B tokens
        "scheduler.decay_tokens=null",
    ]
    if recipe.train.seq_length > args.max_seq_length:
        overrides.append(f"train.seq_length={args.max_seq_length}")
    return overrides


def demo_data_overrides(recipe: Recipe, data: Path, global_batch: int) -> list[str]:
    """Point the recipe's data keys at the demo data ``data_prep demo`` writes under ``data``."""
    common = [
        f"data.tokenizer={data / 'tokenizer'}",
        f"data.cache_dir={data / 'cache'}",
        "data.num_workers=0",
    ]
    stage = recipe.stage
    if stage == "pretrain":
        # The demo corpus is small: the recipes' 99990/10 split would leave validation no document.
        return [*common, f"data.blend={data / 'blend.yaml'}", "data.split='98,2,0'"]
    if stage in ("sft", "qat"):
        out = [*common, "data.blend=null", f"data.sft_path={data / 'sft' / 'train.parquet'}"]
        out.append(f"sft.valid_path={data / 'sft' / 'eval.parquet'}")
        if recipe.sft.thinking_path:
            out.append(f"sft.thinking_path={data / 'sft' / 'train.parquet'}")
        return out
    if stage == "dpo":
        return [
            *common,
            "data.blend=null",
            f"data.dpo_path={data / 'dpo' / 'train.parquet'}",
            f"dpo.valid_path={data / 'dpo' / 'eval.parquet'}",
        ]
    if stage == "rl":
        group = 4
        # Agentic recipes roll out multi-turn episodes with tools: their prompts offer the tools.
        prompts = data / "agentic" / "rl" if recipe.rl.agentic.enabled else data / "rl"
        return [
            *common,
            "data.blend=null",
            f"data.rl_path={prompts / 'train.jsonl'}",
            f"rl.eval_path={prompts / 'eval.jsonl'}",
            "rl.rollout_backend=local",
            "rl.async_rollout=false",
            "rl.pass_rates=null",
            # A fresh 2-layer model earns no reward; keep its zero-variance groups so the loss, its
            # backward and the optimizer step still run (with zero advantages the gradient is 0).
            "rl.filter_zero_variance=false",
            f"rl.group_size={group}",
            f"rl.prompts_per_step={global_batch * recipe.rl.steps_per_rollout // group}",
            "rl.max_new_tokens=32",
            "rl.eval_interval=0",
            "rl.eval_prompts=8",
            "train.eval_interval=0",  # RL evaluates through rl.eval_interval only
        ]
    raise ValueError(f"{recipe.stage}: no demo data for this stage")


def smoke_recipe(
    recipe_path: str, out: Path, data: Path, args: argparse.Namespace, init: Path | None
) -> Recipe:
    """The shipped recipe with the one-device, demo-data and output overrides applied."""
    shipped = load_recipe(recipe_path, list(args.overrides))
    overrides = [
        *one_device_overrides(shipped, args),
        *demo_data_overrides(shipped, data, args.global_batch),
        f"checkpoint.dir={out / 'checkpoints'}",
        f"checkpoint.load={init if init else 'null'}",
        f"checkpoint.save_interval={args.steps}",
        f"logging.dir={out / 'logs'}",
        "logging.interval=1",
        "logging.wandb_project=null",
        *args.overrides,  # the caller's last word
    ]
    recipe = load_recipe(recipe_path, overrides)
    if recipe.stage == "rl":
        recipe.rl.rollout_args = {}  # the shipped engine's (vLLM) arguments mean nothing to `local`
    return recipe


def run_recipe(recipe: Recipe, out: Path, label: str, timeout: int) -> tuple[int, str]:
    """Run one resolved recipe in its own process; returns its exit code and log."""
    out.mkdir(parents=True, exist_ok=True)
    path = save_resolved_recipe(recipe, out)
    log_path = out / "smoke.log"
    argv = [sys.executable, "-m", "joyai_megatron", recipe.stage, str(path)]
    with log_path.open("w") as log:
        log.write(f"# {label}\n$ {' '.join(argv)}\n")
        log.flush()
        try:
            rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, log_path.read_text()


def read_result(recipe_path: str, stage: str, out: Path, seconds: float, rc: int, log: str) -> SmokeResult:
    metrics_path = out / "logs" / "metrics.jsonl"
    rows = (
        [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.is_file() else []
    )
    rows = [r for r in rows if "step" in r and any(k in r for k in LOSS_KEYS)]
    losses = [next(r[k] for k in LOSS_KEYS if k in r) for r in rows]
    ckpt = out / "checkpoints" / "latest_checkpointed_iteration.txt"
    error = ""
    if rc != 0:
        tail = [line for line in log.strip().splitlines() if line.strip()]
        error = f"exit code {rc}: {tail[-1][:300] if tail else ''}"
    elif not losses or not all(math.isfinite(x) for x in losses):
        error = f"non-finite or missing losses: {losses}"
    elif not ckpt.is_file():
        error = f"no checkpoint written ({ckpt} missing)"
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    return SmokeResult(
        recipe=recipe_path,
        stage=stage,
        ok=not error,
        seconds=round(seconds, 1),
        steps=len(rows),
        first_loss=losses[0] if losses else float("nan"),
        last_loss=losses[-1] if losses else float("nan"),
        tokens_per_second=tps[-1] if tps else float("nan"),
        error=error,
    )


def run_name(recipe_path: str) -> str:
    """A directory name unique among the shipped recipes (``sft/joyai_48b_a3b`` and
    ``dpo/joyai_48b_a3b`` share a file name): the file and its folder."""
    path = Path(recipe_path)
    return f"{path.parent.name}_{path.stem}"


def run_one(recipe_path: str, data: Path, args: argparse.Namespace) -> SmokeResult:
    """A recipe that ships with ``checkpoint.load`` starts from the checkpoint of a previous stage:
    one pretraining step of the same model (its model, layout and precision sections) on the demo
    corpus, so the weights-only load and, where a stage carries it over, the optimizer state exist
    at exactly this architecture."""
    out = args.work / run_name(recipe_path)
    shipped = load_recipe(recipe_path, list(args.overrides))
    started = time.time()
    init = None
    if shipped.checkpoint.load:
        init = out / "init" / "checkpoints"
        previous = smoke_recipe(recipe_path, out / "init", data, args, None)
        previous.stage = "pretrain"
        previous.data.blend = str(data / "blend.yaml")
        previous.data.split = "98,2,0"
        previous.train.train_iters = previous.checkpoint.save_interval = 1
        previous.train.eval_interval = 0
        rc, log = run_recipe(previous, out / "init", f"{recipe_path}: the checkpoint it loads", args.timeout)
        if rc != 0:
            return read_result(recipe_path, shipped.stage, out / "init", time.time() - started, rc, log)
    recipe = smoke_recipe(recipe_path, out, data, args, init)
    rc, log = run_recipe(recipe, out, recipe_path, args.timeout)
    result = read_result(recipe_path, recipe.stage, out, time.time() - started, rc, log)
    if not args.keep_checkpoints:
        for directory in (out / "checkpoints", out / "init" / "checkpoints"):
            shutil.rmtree(directory, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m joyai_megatron smoke", description=__doc__)
    parser.add_argument("recipes", nargs="+", help="recipe YAML files (e.g. recipes/*/joyai_48b_a3b*.yaml)")
    parser.add_argument(
        "--override", dest="overrides", action="append", default=[], help="key=value for every recipe"
    )
    parser.add_argument("--work", type=Path, default=Path("runs/smoke"))
    parser.add_argument(
        "--data", type=Path, default=None, help="a `data_prep demo` directory (default: build one)"
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=8192, help="the demo tokenizer's vocabulary")
    parser.add_argument("--keep-checkpoints", action="store_true", help="default: deleted once checked")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--max-seq-length", type=int, default=32768)
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per recipe")
    parser.add_argument(
        "--jobs", type=int, default=1, help="recipes run at the same time (one GPU holds several)"
    )
    args = parser.parse_args(argv)
    data = (args.data or args.work / "data").resolve()
    args.work = args.work.resolve()
    if not (data / "blend.yaml").is_file():
        from data_prep.demo import build_demo

        build_demo(data, progress=False)
    if not (data / "agentic" / "rl" / "train.jsonl").is_file() and any(
        load_recipe(path, list(args.overrides)).rl.agentic.enabled for path in args.recipes
    ):
        from data_prep.agentic_demo import build_agentic_demo

        build_agentic_demo(data / "agentic", tokenizer=data / "tokenizer")
    results = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, recipe_path, data, args) for recipe_path in args.recipes]
        for future in futures:
            result = future.result()
            results.append(result)
            status = "ok  " if result.ok else "FAIL"
            print(
                f"{status} {result.recipe}: {result.steps} steps in {result.seconds:.0f}s, loss {result.first_loss:.4f} -> "
                f"{result.last_loss:.4f}, {result.tokens_per_second:,.0f} tokens/s {result.error}",
                flush=True,
            )
    (args.work / "smoke.json").write_text(json.dumps([r.__dict__ for r in results], indent=2))
    failed = [r.recipe for r in results if not r.ok]
    if failed:
        print(
            f"smoke: {len(failed)} of {len(results)} failed: {', '.join(failed)} (logs: {args.work}/*/smoke.log)"
        )
        return 1
    return 0
