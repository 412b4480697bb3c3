"""The QAT trainer: the shared trainer core with ModelOpt quantizers in the model.

Order (the base class builds model -> optimizer -> loads weights -> data):

1. Resume (or ``checkpoint.load`` naming a QAT/PTQ checkpoint): ``_build_model`` restores the
   quantizers recorded in that checkpoint right after the chunks exist, before the optimizer, so
   the model's and the optimizer's checkpoint keys are the quantized model's; the base class then
   loads weights, optimizer state and the calibrated amax values.
2. Fresh start from an unquantized checkpoint: the base class loads it into the plain model first,
   because a quantized Megatron model names some tensors differently in checkpoints (ModelOpt
   stores SwiGLU ``linear_fc1`` as ``weight_w``/``weight_v``), then ``_load`` inserts the
   quantizers.  Quantizers add buffers, never parameters, so the optimizer and the DDP buckets
   built before stay valid.  Then ``max`` calibration over ``qat.calib_batches`` training batches
   and (with ``qat.compare``) the validation loss of the unquantized and of the PTQ model.
3. Training: forward passes fake-quantize, gradients pass straight through to the high-precision
   master weights.  Every checkpoint gets ``modelopt_state/`` inside its atomic directory.
4. End: the QAT model's validation loss next to the two baselines (printed, ``qat_compare.json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from megatron.core.num_microbatches_calculator import get_num_microbatches

from joyai_megatron.config.schema import Recipe
from joyai_megatron.quant import modelopt_state as mos
from joyai_megatron.quant.formats import modelopt_config
from joyai_megatron.training import checkpoint as ckpt
from joyai_megatron.training.checkpoint_scan import start_point
from joyai_megatron.training.ddp import adding_submodules
from joyai_megatron.training.trainer import Trainer

LOSS_KEY = "valid/lm_loss"


class QATTrainer(Trainer):
    def __init__(self, recipe: Recipe, stage: type) -> None:
        # Before the base class: importing ModelOpt first lets the CPU redirects cover its plugin.
        self.quant_config = modelopt_config(recipe)
        self.quant_source: Path | None = None  # checkpoint whose quantizers were restored
        if recipe.qat.freeze:
            # The base trainer freezes the stage class's parameter substrings before DDP.
            frozen = (*stage.frozen_parameters, *recipe.qat.freeze)
            stage = type(stage.__name__, (stage,), {"frozen_parameters": frozen})
        super().__init__(recipe, stage)
        if self._is_log_rank():
            where = f"restored from {self.quant_source}" if self.quant_source else "inserted"
            print(f"[qat] {recipe.qat.format}: quantizers {where}: {self.quant_summary}", flush=True)
        if self.quant_source is None:
            self._calibrate()
            if recipe.qat.compare:
                self._evaluate_baselines()

    # --- quantizers -------------------------------------------------------------------------------
    def _build_model(self) -> list[torch.nn.Module]:
        chunks = super()._build_model()
        self.quant_source = self._quantized_source()
        if self.quant_source is not None:
            with adding_submodules(chunks):
                for chunk in chunks:
                    mos.restore_state(ckpt.unwrap(chunk), self.quant_source)
        return chunks

    def _load(self) -> str | None:
        loaded = super()._load()
        if self.quant_source is None:
            with adding_submodules(self.model):
                for model in self._models():
                    mos.insert_quantizers(model, self.quant_config)
        self.quant_summary = mos.summary(self._models()[0])
        return loaded

    def _quantized_source(self) -> Path | None:
        """The checkpoint the base class will load, if it carries ModelOpt state."""
        c = self.recipe.checkpoint
        start = start_point(c.dir, c.load, c.allow_fresh_start)
        if start.path is None:
            return None
        if start.resuming and not mos.has_modelopt_state(start.path):
            raise RuntimeError(
                f"{start.path}: resuming QAT from a checkpoint without {mos.MODELOPT_STATE_DIR}/; "
                f"checkpoint.dir must hold only this QAT run's checkpoints"
            )
        return start.path if start.resuming or mos.has_modelopt_state(start.path) else None

    def _models(self) -> list[torch.nn.Module]:
        return [ckpt.unwrap(chunk) for chunk in self.model]

    def _calibrate(self) -> None:
        """``max`` calibration on the first ``qat.calib_batches`` global batches of training data."""
        t, q = self.recipe.train, self.recipe.qat

        def forward_loop(_model: torch.nn.Module) -> None:
            # All pipeline stages calibrate together: the schedule passes activations between them.
            for i in range(q.calib_batches):
                batches = self.stage.microbatches("train", i * t.global_batch_size, get_num_microbatches())
                self.run_microbatches(batches, forward_only=True)

        for model in self._models():
            mos.calibrate(model, forward_loop, q.weight_amax)
        self._clean_mtp_tracker()

    def write_checkpoint_extras(self, directory: Path) -> None:
        for model in self._models():
            mos.save_state(model, directory)

    # --- comparison -------------------------------------------------------------------------------
    def _clean_mtp_tracker(self) -> None:
        from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

        MTPLossLoggingHelper.clean_metrics_in_tracker()

    def _eval_loss(self, quantized: bool) -> float:
        if quantized:
            return self.evaluate()[LOSS_KEY]
        with mos.quantization_disabled(self._models()):
            return self.evaluate()[LOSS_KEY]

    def _evaluate_baselines(self) -> None:
        """Validation loss of the starting weights, unquantized and round-to-nearest quantized."""
        values = {"unquantized": self._eval_loss(False), "ptq": self._eval_loss(True)}
        self.stage.comparison.update(values)
        self.logger.scalars(self.state.iteration, {f"qat/{k}_loss": v for k, v in values.items()})
        if self._is_log_rank():
            print(
                f"[qat] start: valid loss unquantized {values['unquantized']:.4f} | "
                f"PTQ {self.recipe.qat.format} {values['ptq']:.4f}",
                flush=True,
            )

    def train(self) -> dict[str, Any]:
        result = super().train()
        if self.recipe.qat.compare and result["exit_reason"] == "finished":
            result["comparison"] = self.compare()
        return result

    def compare(self) -> dict[str, float]:
        """The three losses of the acceptance check, plus the QAT master weights unquantized."""
        values = dict(self.stage.comparison)
        values["qat"] = self._eval_loss(True)
        values["qat_unquantized"] = self._eval_loss(False)
        if self._is_log_rank():
            print(format_comparison(values, self.recipe.qat.format), flush=True)
            out = Path(self.recipe.logging.dir) / "qat_compare.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"format": self.recipe.qat.format, **values}, indent=1) + "\n")
        return values


def format_comparison(values: dict[str, float], fmt: str) -> str:
    """One line with each loss and its gap to the unquantized starting model."""
    base = values.get("unquantized")

    def show(key: str, label: str) -> str:
        if key not in values:
            return f"{label} n/a"
        gap = f" ({values[key] - base:+.4f})" if base is not None and key != "unquantized" else ""
        return f"{label} {values[key]:.4f}{gap}"

    return "[qat] valid loss: " + " | ".join(
        [
            show("unquantized", "unquantized start"),
            show("ptq", f"PTQ {fmt}"),
            show("qat", f"QAT {fmt}"),
            show("qat_unquantized", "QAT master weights unquantized"),
        ]
    )
