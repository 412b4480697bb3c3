"""QAT: another stage's data and loss, trained through ModelOpt fake quantization.

The stage itself only chooses the data (``qat.data``: the pretraining mixture or the SFT set, with
that stage's forward step and loss) and keeps the comparison losses across resumes; quantizers,
calibration and ModelOpt checkpoint state live in :class:`~joyai_megatron.quant.trainer.QATTrainer`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from joyai_megatron.config.schema import Recipe
from joyai_megatron.quant.trainer import QATTrainer
from joyai_megatron.training.stage import Stage


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
    trainer_class = QATTrainer

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        from joyai_megatron.model.presets import recipe_arch
        from joyai_megatron.quant.formats import check_qat_recipe

        check_qat_recipe(recipe, recipe_arch(recipe))
        data_stage_class(recipe.qat.data).check_recipe(recipe)

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        self.data_stage = data_stage_class(recipe.qat.data)(recipe)
        self.uses_mtp_loss = self.data_stage.uses_mtp_loss
        # Baseline losses measured at the start; resumed runs carry them in the train state.
        self.comparison: dict[str, float] = {}

    def build_datasets(self, train_samples: int, valid_samples: int) -> dict[str, Any]:
        self.datasets = self.data_stage.build_datasets(train_samples, valid_samples)
        return self.datasets

    def forward_step(self, data_iterator: Iterator, model: torch.nn.Module):
        return self.data_stage.forward_step(data_iterator, model)

    def microbatches(self, split: str, start: int, num_microbatches: int) -> list[dict[str, torch.Tensor]]:
        return self.data_stage.microbatches(split, start, num_microbatches)

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        self.data_stage.setup(trainer)

    def before_step(self, trainer: Any) -> None:
        self.data_stage.before_step(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"comparison": dict(self.comparison), "data": self.data_stage.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.comparison = {k: float(v) for k, v in state.get("comparison", {}).items()}
        self.data_stage.load_state_dict(state.get("data", {}))

    def log_metrics(self) -> dict[str, float]:
        return self.data_stage.log_metrics()
