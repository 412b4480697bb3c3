"""``python -m joyai_megatron.stages.qat_compare --qat <qat ckpt> [--reference <ckpt>]``: the three losses.

Validation loss (main LM loss, token-weighted, on the QAT recipe's validation split) of

* ``unquantized``: the reference checkpoint (default: the one the QAT run started from,
  ``checkpoint.load`` in its saved recipe) in high precision;
* ``ptq``: the same weights quantized with the QAT recipe's format and calibration, no training;
* ``qat``: the QAT checkpoint, fake-quantized (= its round-to-nearest INT4 model);
* ``qat_unquantized``: the QAT checkpoint's master weights without quantization.

It runs the QAT trainer's own evaluation (same data order, calibration batches and loss) without
training, so its numbers equal those the ``qat`` stage prints at its start and end.  Works on the
training layout too: launch it with ``torchrun`` like the stage.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

from joyai_megatron.config.recipe import load_recipe
from joyai_megatron.config.schema import Recipe
from joyai_megatron.convert.dist_ckpt import resolve_iteration_dir
from joyai_megatron.errors import cli_entry
from joyai_megatron.quant import modelopt_state as mos


def _evaluation_recipe(recipe: Recipe, load: str, work_dir: Path) -> Recipe:
    """The QAT recipe, loading ``load`` as weights only, writing nothing outside ``work_dir``."""
    r = copy.deepcopy(recipe)
    r.checkpoint.dir = str(work_dir / "checkpoints")  # stays empty: nothing is saved
    r.checkpoint.load = load
    r.checkpoint.load_optimizer = False
    r.checkpoint.reset_counters = True
    r.logging.dir = str(work_dir / "logs")
    r.logging.tensorboard = False
    r.logging.wandb_project = None
    r.qat.compare = True
    if not r.train.eval_interval:
        r.train.eval_interval = r.train.train_iters or 1
    return r


def compare_checkpoints(
    qat_checkpoint: str, reference: str | None = None, overrides: list[str] | None = None
) -> dict[str, float]:
    """Build the QAT stage's trainer twice (reference, then QAT weights) and evaluate; no training."""
    from joyai_megatron.stages.qat import QATStage
    from joyai_megatron.training.distributed import shutdown
    from joyai_megatron.training.trainer import Trainer

    qat_dir = resolve_iteration_dir(qat_checkpoint)
    if not mos.has_modelopt_state(qat_dir):
        raise SystemExit(f"{qat_dir}: no {mos.MODELOPT_STATE_DIR}/; --qat must name a QAT checkpoint")
    recipe = load_recipe(qat_dir / "recipe.yaml", overrides)
    reference = reference or recipe.checkpoint.load
    if not reference:
        raise SystemExit(f"{qat_dir}/recipe.yaml has no checkpoint.load; pass --reference")
    values: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="qat_compare_") as tmp:
        try:
            for name, source in (("reference", reference), ("qat", str(qat_dir))):
                trainer = Trainer(_evaluation_recipe(recipe, source, Path(tmp) / name), QATStage)
                try:
                    if name == "reference":
                        values.update(trainer.stage.comparison)
                    else:
                        trainer.stage.comparison = dict(values)
                        values = trainer.stage.compare()
                finally:
                    trainer.logger.close()
                    trainer.signals.restore()
        finally:
            shutdown()
    return values


@cli_entry
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m joyai_megatron.stages.qat_compare", description=__doc__.split("\n")[0]
    )
    p.add_argument("--qat", required=True, help="QAT <ckpt_dir> or <ckpt_dir>/iter_*")
    p.add_argument("--reference", help="unquantized checkpoint (default: the QAT recipe's checkpoint.load)")
    p.add_argument("--json", help="also write the losses to this file")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.eval_iters=8")
    args = p.parse_args(argv)
    values = compare_checkpoints(args.qat, args.reference, args.overrides)
    if args.json:
        Path(args.json).write_text(json.dumps(values, indent=1) + "\n")
    closer = abs(values["qat"] - values["unquantized"]) < abs(values["ptq"] - values["unquantized"])
    print(
        f"[qat] QAT round-to-nearest model is {'closer to' if closer else 'NOT closer to'} the "
        f"unquantized model than PTQ is"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
