"""``python -m joyai_megatron eval RECIPE_OR_CHECKPOINT --tasks ...``: lm-eval + MTP acceptance.

The checkpoint (a recipe's ``checkpoint.dir``, a checkpoint root or one ``iter_*`` directory) is
rebuilt in this process as SFT evaluation does (``local`` backend, fp32; CPU or one GPU) and
scored through lm-eval's own ``simple_evaluate`` with :class:`MegatronLM` on the shipped local
tasks (``evaluation/tasks``: no hub access).  Results go to ``<checkpoint root>/eval/iter_N_<mode>.json``
(or ``--output``) and, as ``eval/<task>/<metric>`` scalars at the checkpoint's step, to the
recipe's TensorBoard/wandb under ``<logging.dir>/eval``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

DEFAULT_TASKS = ("joyai_demo_choice", "joyai_demo_math", "joyai_demo_heldout")


def resolve_target(target: str) -> Path:
    """The ``iter_*`` directory a recipe (its ``checkpoint.dir``) or a checkpoint path names."""
    from joyai_megatron.training.checkpoint import resolve_checkpoint

    path = Path(target)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        from joyai_megatron.config.recipe import load_recipe

        path = Path(load_recipe(str(path), []).checkpoint.dir)
    return resolve_checkpoint(path)


def task_metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's ``results`` as ``{task: {metric: value}}`` (filter suffixes and stderr dropped)."""
    table: dict[str, dict[str, float]] = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            metric, _, _ = key.partition(",")
            if "," in key and not metric.endswith("_stderr") and isinstance(value, int | float):
                table.setdefault(task, {})[metric] = float(value)
    return table


def mtp_acceptance(
    lm: Any, prompts: list[str], max_new_tokens: int, draft_tokens: int, chat_template: bool
) -> dict[str, Any]:
    """Self-speculative decoding's acceptance on ``prompts`` (rendered as the tasks render them)."""
    from joyai_megatron.stages.speculative import speculative_generate

    if chat_template:
        prompts = [lm.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    ids = [lm.tok_encode(p) for p in prompts]
    _, stats = speculative_generate(lm.model, ids, max_new_tokens, lm.stop_ids, draft_tokens)
    return {"prompts": len(ids), "max_new_tokens": max_new_tokens, **stats.summary()}


def evaluate(
    target: str,
    tasks: list[str],
    *,
    limit: int | None = None,
    chat_template: bool = True,
    thinking: bool = False,
    mtp: bool = False,
    draft_tokens: int = 3,
    mtp_max_new_tokens: int = 64,
    tokenizer: str | None = None,
    output: str | None = None,
    log: bool = True,
) -> dict[str, Any]:
    """Score one checkpoint; returns (and writes) the results document."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from joyai_megatron.evaluation.lm import MegatronLM
    from joyai_megatron.evaluation.tasks.utils import TASK_DIR, load_jsonl
    from joyai_megatron.stages.sft_eval import load_checkpoint_model

    started = time.time()
    iteration_dir = resolve_target(target)
    model, recipe = load_checkpoint_model(iteration_dir)
    tokenizer = tokenizer or recipe.data.tokenizer
    if not tokenizer:
        raise SystemExit("the checkpoint's recipe names no data.tokenizer: pass --tokenizer")
    lm = MegatronLM(
        model,
        AutoTokenizer.from_pretrained(tokenizer),
        max_length=recipe.train.seq_length,
        enable_thinking=thinking,
    )
    raw = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        limit=limit,
        apply_chat_template=chat_template,
        task_manager=TaskManager(include_path=str(TASK_DIR)),
        log_samples=False,
        bootstrap_iters=0,
    )
    mode = f"{'chat' if chat_template else 'plain'}_{'thinking' if thinking else 'nothinking'}"
    doc: dict[str, Any] = {
        "checkpoint": str(iteration_dir),
        "iteration": _iteration(iteration_dir),
        "mode": {"chat_template": chat_template, "thinking": thinking},
        "lm_eval_version": lm_eval.__version__,
        "limit": limit,
        "tasks": task_metrics(raw),
        "n_samples": {t: v.get("effective", v.get("original")) for t, v in raw.get("n-samples", {}).items()},
    }
    if mtp and getattr(model, "mtp", None) is None:  # e.g. RL, which trains without the block
        doc["mtp_acceptance"] = {"skipped": "the checkpoint's model has no MTP block (model.mtp_enabled)"}
    elif mtp:
        prompts = [row["prompt"] for row in load_jsonl("joyai_demo_math.jsonl")["test"]][:limit]
        doc["mtp_acceptance"] = mtp_acceptance(lm, prompts, mtp_max_new_tokens, draft_tokens, chat_template)
    doc["seconds"] = time.time() - started
    path = Path(output) if output else iteration_dir.parent / "eval" / f"{iteration_dir.name}_{mode}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    doc["written_to"] = str(path)
    if log:
        _log_scalars(recipe, doc)
    return doc


def _iteration(iteration_dir: Path) -> int:
    digits = iteration_dir.name.removeprefix("iter_")
    return int(digits) if digits.isdigit() else 0


def _log_scalars(recipe: Any, doc: dict[str, Any]) -> None:
    """``eval/<task>/<metric>`` (and ``eval/mtp/...``) at the checkpoint's step, under ``<logging.dir>/eval``."""
    import copy

    from joyai_megatron.training.metrics import MetricsLogger

    recipe = copy.deepcopy(recipe)
    recipe.logging.dir = str(Path(recipe.logging.dir) / "eval")
    values = {f"eval/{task}/{m}": v for task, metrics in doc["tasks"].items() for m, v in metrics.items()}
    for key in ("acceptance_length", "acceptance_ratio", "tokens_per_target_forward"):
        if key in doc.get("mtp_acceptance", {}):
            values[f"eval/mtp/{key}"] = doc["mtp_acceptance"][key]
    logger = MetricsLogger(recipe, is_writer=True, flops_per_token=0.0, world_size=1)
    try:
        logger.scalars(doc["iteration"], values)
    finally:
        logger.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target", help="recipe YAML (its checkpoint.dir), checkpoint root or iter_* directory"
    )
    parser.add_argument(
        "--tasks",
        default=",".join(DEFAULT_TASKS),
        help="comma-separated lm-eval tasks (shipped: joyai_demo_*)",
    )
    parser.add_argument("--limit", type=int, help="score only the first N documents of each task")
    parser.add_argument(
        "--chat-template", action=argparse.BooleanOptionalAction, default=True, help="render prompts as chat"
    )
    parser.add_argument(
        "--thinking",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="the template's thinking mode",
    )
    parser.add_argument(
        "--mtp-acceptance", action="store_true", help="also self-speculative decoding with the MTP block"
    )
    parser.add_argument("--draft-tokens", type=int, default=3, help="MTP tokens drafted per step (1-3)")
    parser.add_argument("--mtp-max-new-tokens", type=int, default=64)
    parser.add_argument("--tokenizer", help="default: the checkpoint recipe's data.tokenizer")
    parser.add_argument("--output", help="results JSON (default: <checkpoint root>/eval/iter_N_<mode>.json)")
    parser.add_argument("--no-log", action="store_true", help="do not write TensorBoard/wandb scalars")


def main(args: argparse.Namespace) -> int:
    from joyai_megatron.training.distributed import shutdown

    try:
        doc = evaluate(
            args.target,
            [t for t in args.tasks.split(",") if t],
            limit=args.limit,
            chat_template=args.chat_template,
            thinking=args.thinking,
            mtp=args.mtp_acceptance,
            draft_tokens=args.draft_tokens,
            mtp_max_new_tokens=args.mtp_max_new_tokens,
            tokenizer=args.tokenizer,
            output=args.output,
            log=not args.no_log,
        )
    finally:
        shutdown()
    print(
        json.dumps(
            {k: doc[k] for k in ("checkpoint", "tasks", "mtp_acceptance", "written_to") if k in doc}, indent=1
        )
    )
    return 0
