"""QAT: another stage's data and loss, trained through ModelOpt fake quantization.

The data (``qat.data``) is the pretraining mixture or the SFT set, with that stage's forward step
and loss. The quantizers come in through the stage hooks of the shared trainer
(model -> optimizer -> checkpoint load -> data):

1. Resume (or ``checkpoint.load`` naming a QAT/PTQ checkpoint): ``on_model_built`` restores the
   quantizers recorded in that checkpoint right after the chunks exist, before the optimizer, so
   the model's and the optimizer's checkpoint keys are the quantized model's; the trainer then
   loads weights, optimizer state and the calibrated amax values.
2. Fresh start from an unquantized checkpoint: the trainer loads it into the plain model first,
   because a quantized Megatron model names some tensors differently in checkpoints (ModelOpt
   stores SwiGLU ``linear_fc1`` as ``weight_w``/``weight_v``), then ``setup`` inserts the
   quantizers.  Quantizers add buffers, never parameters, so the optimizer and the DDP buckets
   built before stay valid.  Then ``max`` calibration over ``qat.calib_batches`` training batches
   and (with ``qat.compare``) the validation loss of the unquantized and of the PTQ model.
3. Training: forward passes fake-quantize, gradients pass straight through to the high-precision
   master weights.  Every checkpoint gets ``modelopt_state/`` inside its atomic directory.
4. End: the QAT model's validation loss next to the two baselines (printed, ``qat_compare.json``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from megatron.core.num_microbatches_calculator import get_num_microbatches

from joyai_megatron.config.schema import Recipe
from joyai_megatron.quant import modelopt_state as mos
from joyai_megatron.quant.formats import modelopt_config
from joyai_megatron.training import checkpoint as ckpt
from joyai_megatron.training.ddp import forward_pre_hooks_off
from joyai_megatron.training.stage import Stage

LOSS_KEY = "valid/lm_loss"


def data_stage_class(data: str) -> type[Stage]:
    if data == "pretrain":
        from joyai_megatron.stages.pretrain import PretrainStage

        return PretrainStage
    if data == "sft":
        try:
            from joyai_megatron.stages.sft import SFTStage
        except ImportError as err:
            raise ValueError(f"qat.data=sft needs the SFT stage, which this checkout lacks ({err})") from err
        return SFTStage
    raise ValueError(f"qat.data={data!r}; expected 'pretrain' or 'sft'")


class QATStage(Stage):
    name = "qat"

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        from joyai_megatron.model.presets import recipe_arch
        from joyai_megatron.quant.formats import check_qat_recipe

        check_qat_recipe(recipe, recipe_arch(recipe))
        data_stage_class(recipe.qat.data).check_recipe(recipe)

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        # Before any process group: importing ModelOpt first lets the CPU redirects cover its plugin.
        self.quant_config = modelopt_config(recipe)
        self.frozen_parameters = (*type(self).frozen_parameters, *recipe.qat.freeze)
        self.data_stage = data_stage_class(recipe.qat.data)(recipe)
        self.uses_mtp_loss = self.data_stage.uses_mtp_loss
        # Baseline losses measured at the start; resumed runs carry them in the train state.
        self.comparison: dict[str, float] = {}
        self.quant_source: Path | None = None  # checkpoint whose quantizers were restored

    # --- quantizers -------------------------------------------------------------------------------
    def on_model_built(self, trainer: Any) -> None:
        self.quant_source = self._quantized_source(trainer.start)
        if self.quant_source is not None:
            with forward_pre_hooks_off(trainer.model, param_sync=False):
                for chunk in trainer.model:
                    mos.restore_state(ckpt.unwrap(chunk), self.quant_source)

    @staticmethod
    def _quantized_source(start: Any) -> Path | None:
        """The checkpoint the trainer will load (``start``), if it carries ModelOpt state."""
        if start.path is None:
            return None
        if start.resuming and not mos.has_modelopt_state(start.path):
            raise RuntimeError(
                f"{start.path}: resuming QAT from a checkpoint without {mos.MODELOPT_STATE_DIR}/; "
                f"checkpoint.dir must hold only this QAT run's checkpoints"
            )
        return start.path if start.resuming or mos.has_modelopt_state(start.path) else None

    def _models(self) -> list[torch.nn.Module]:
        return [ckpt.unwrap(chunk) for chunk in self.trainer.model]

    def _calibrate(self) -> None:
        """``max`` calibration on the first ``qat.calib_batches`` global batches of training data."""
        t, q = self.recipe.train, self.recipe.qat

        def forward_loop(_model: torch.nn.Module) -> None:
            # All pipeline stages calibrate together: the schedule passes activations between them.
            for i in range(q.calib_batches):
                batches = self.microbatches("train", i * t.global_batch_size, get_num_microbatches())
                self.trainer.run_microbatches(batches, forward_only=True)

        for model in self._models():
            mos.calibrate(model, forward_loop, q.weight_amax)
        _clean_mtp_tracker()

    def write_checkpoint_extras(self, directory: Path) -> None:
        for model in self._models():
            mos.save_state(model, directory)

    def build_datasets(self, train_samples: int, valid_samples: int) -> dict[str, Any]:
        self.datasets = self.data_stage.build_datasets(train_samples, valid_samples)
        return self.datasets

    def forward_step(self, data_iterator: Iterator, model: torch.nn.Module):
        return self.data_stage.forward_step(data_iterator, model)

    def microbatches(self, split: str, start: int, num_microbatches: int) -> list[dict[str, torch.Tensor]]:
        return self.data_stage.microbatches(split, start, num_microbatches)

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        if self.quant_source is None:
            with forward_pre_hooks_off(trainer.model, param_sync=False):
                for model in self._models():
                    mos.insert_quantizers(model, self.quant_config)
        self.data_stage.setup(trainer)
        if trainer.is_log_rank():
            where = f"restored from {self.quant_source}" if self.quant_source else "inserted"
            summary = mos.summary(self._models()[0])
            print(f"[qat] {self.recipe.qat.format}: quantizers {where}: {summary}", flush=True)
        if self.quant_source is None:
            self._calibrate()
            if self.recipe.qat.compare:
                self._evaluate_baselines()

    def before_step(self, trainer: Any) -> None:
        self.data_stage.before_step(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"comparison": dict(self.comparison), "data": self.data_stage.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.comparison = {k: float(v) for k, v in state.get("comparison", {}).items()}
        self.data_stage.load_state_dict(state.get("data", {}))

    def log_metrics(self) -> dict[str, float]:
        return self.data_stage.log_metrics()

    # --- comparison -------------------------------------------------------------------------------
    def _eval_loss(self, quantized: bool) -> float:
        if quantized:
            return self.trainer.evaluate()[LOSS_KEY]
        with mos.quantization_disabled(self._models()):
            return self.trainer.evaluate()[LOSS_KEY]

    def _evaluate_baselines(self) -> None:
        """Validation loss of the starting weights, unquantized and round-to-nearest quantized."""
        values = {"unquantized": self._eval_loss(False), "ptq": self._eval_loss(True)}
        self.comparison.update(values)
        trainer = self.trainer
        trainer.logger.scalars(trainer.state.iteration, {f"qat/{k}_loss": v for k, v in values.items()})
        if trainer.is_log_rank():
            print(
                f"[qat] start: valid loss unquantized {values['unquantized']:.4f} | "
                f"PTQ {self.recipe.qat.format} {values['ptq']:.4f}",
                flush=True,
            )

    def on_train_end(self, trainer: Any, result: dict[str, Any]) -> None:
        if self.recipe.qat.compare and result["exit_reason"] == "finished":
            result["comparison"] = self.compare()

    def compare(self) -> dict[str, float]:
        """The three losses of the acceptance check, plus the QAT master weights unquantized."""
        values = dict(self.comparison)
        values["qat"] = self._eval_loss(True)
        values["qat_unquantized"] = self._eval_loss(False)
        if self.trainer.is_log_rank():
            print(format_comparison(values, self.recipe.qat.format), flush=True)
            out = Path(self.recipe.logging.dir) / "qat_compare.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"format": self.recipe.qat.format, **values}, indent=1) + "\n")
        return values


def _clean_mtp_tracker() -> None:
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    MTPLossLoggingHelper.clean_metrics_in_tracker()


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
