"""``python -m joyai_megatron <command>``: training stages, ``eval``, ``merge``, ``count``, ``plan`` and ``smoke``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys

from joyai_megatron.errors import cli_entry

# stage name -> (module, class); imported lazily so `count` and `plan` stay light.
STAGES = {
    "pretrain": ("joyai_megatron.stages.pretrain", "PretrainStage"),
    "sft": ("joyai_megatron.stages.sft", "SFTStage"),
    "dpo": ("joyai_megatron.stages.dpo", "DPOStage"),
    "rl": ("joyai_megatron.stages.rl", "RLStage"),
    "qat": ("joyai_megatron.stages.qat", "QATStage"),
}


def run_stage(stage: str, recipe_path: str, overrides: list[str]) -> dict:
    """Load the recipe, run the stage on the shared trainer, and tear down process groups."""
    from joyai_megatron.config.recipe import RecipeError, load_recipe
    from joyai_megatron.training.distributed import shutdown

    recipe = load_recipe(recipe_path, overrides)
    if recipe.stage != stage:
        raise RecipeError(
            "wrong stage",
            f"{recipe_path}: stage",
            f"the recipe is for '{recipe.stage}'",
            f"run `{recipe.stage}`",
        )
    module, cls = STAGES[stage]
    try:
        stage_cls = getattr(importlib.import_module(module), cls)
    except ModuleNotFoundError as err:
        raise SystemExit(f"stage '{stage}' is not available in this checkout ({err})") from err
    from joyai_megatron.training.trainer import Trainer

    try:
        return Trainer(recipe, stage_cls).train()
    finally:
        shutdown()


def _count(args: argparse.Namespace) -> int:
    from joyai_megatron.model.count import count_model
    from joyai_megatron.model.presets import get_preset
    from joyai_megatron.training.distributed import init_distributed, shutdown

    try:
        init_distributed()
        counts = count_model(get_preset(args.preset), seq_length=args.seq_length, mtp=not args.no_mtp)
    finally:
        shutdown()
    print(json.dumps(dataclasses.asdict(counts), indent=2))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from joyai_megatron.training.plan import main as plan_main

    return plan_main(args)


def _merge(args: argparse.Namespace) -> int:
    from joyai_megatron.convert.common import ConversionError
    from joyai_megatron.convert.merge import merge_checkpoints, parse_checkpoint_arg

    try:
        r = merge_checkpoints(
            [parse_checkpoint_arg(c) for c in args.checkpoint],
            args.output,
            ema_decay=args.ema_decay,
            iteration=args.iteration,
            threads=args.threads,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for i in r.inputs:
        print(f"merge: {i.weight:.6g} x {i.path}")
    print(f"merge: {r.tensors} tensors, {r.bytes / 2**30:.3f} GiB -> {r.iteration_dir} ({r.seconds:.1f} s)")
    return 0


@cli_entry
def main(raw: list[str]) -> int:
    if raw[:1] == ["smoke"]:
        from joyai_megatron.smoke import main as smoke_main

        return smoke_main(raw[1:])
    parser = argparse.ArgumentParser(prog="python -m joyai_megatron", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in STAGES:
        p = sub.add_parser(name, help=f"run the {name} stage")
        p.add_argument("recipe", help="recipe YAML")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.train_iters=10")
    p = sub.add_parser("count", help="parameter and FLOP counts of a preset (built on the meta device)")
    p.add_argument("preset")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--no-mtp", action="store_true")
    p = sub.add_parser("plan", help="per-GPU memory and step-time estimate for a recipe's layout")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--gpu-memory-gb", type=float, default=80.0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--mfu", type=float, default=0.35, help="assumed model FLOPs utilisation")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="per-GPU dense BF16 peak")
    p.add_argument("--reserve-gb", type=float, default=None, help="default: 3 GB + 10%% of the GPU")
    p = sub.add_parser("eval", help="lm-eval on local tasks (+ MTP draft acceptance) for a checkpoint")
    from joyai_megatron.evaluation.run import add_arguments as add_eval_arguments

    add_eval_arguments(p)
    p = sub.add_parser("merge", help="weighted average of torch_dist checkpoints (weights only)")
    p.add_argument(
        "--checkpoint", action="append", required=True, metavar="DIR[:WEIGHT]",
        help="<ckpt_dir> (its newest step) or an iter_* directory, optionally with a weight; repeat. "
        "No weights: uniform average",
    )  # fmt: skip
    p.add_argument("--output", required=True)
    p.add_argument("--ema-decay", type=float, help="weights of a per-step EMA over the iter_* snapshots")
    p.add_argument("--iteration", type=int, help="the output's iter_* number (default: the newest input's)")
    p.add_argument("--threads", type=int, default=4, help="parallel chunk writers (memory scales with it)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    sub.add_parser("smoke", help="train shipped recipes a few steps on one GPU (see `smoke --help`)")
    args = parser.parse_args(raw)
    if args.command == "count":
        return _count(args)
    if args.command == "plan":
        return _plan(args)
    if args.command == "merge":
        return _merge(args)
    if args.command == "eval":
        from joyai_megatron.evaluation.run import main as eval_main

        return eval_main(args)
    run_stage(args.command, args.recipe, args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
