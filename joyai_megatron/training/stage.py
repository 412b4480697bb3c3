"""What a stage plugs into the trainer: its data and its loss.

The trainer owns distribution, the model, optimizer, schedule, checkpoints and logging.  A stage
supplies map-style datasets and a ``forward_step``; sampling is deterministic in the number of
consumed samples, so resuming at sample N on any data-parallel size replays the same batches.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state

from joyai_megatron.config.schema import Recipe

LossFunc = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


def microbatch_indices(
    start: int, num_microbatches: int, micro_batch_size: int, dp_rank: int, dp_size: int, length: int
) -> list[list[int]]:
    """Sample indices of this DP rank's micro-batches for one global batch starting at ``start``.

    Micro-batch k of rank r holds samples ``start + k*mbs*dp + r*mbs + [0, mbs)``: the global batch
    is the same set of samples whatever the DP size, which is what makes layouts comparable.
    """
    per_step = micro_batch_size * dp_size
    batches = []
    for k in range(num_microbatches):
        base = start + k * per_step + dp_rank * micro_batch_size
        batches.append([(base + i) % length for i in range(micro_batch_size)])
    return batches


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    out = {}
    for key in samples[0]:
        values = [torch.as_tensor(s[key]) for s in samples]
        out[key] = torch.stack(values)
    return out


class Stage(ABC):
    """Base class: subclasses set ``name`` and implement ``build_datasets`` and ``forward_step``."""

    name = "stage"
    # Whether the trainer should let Megatron-Core's GPTModel compute the MTP loss.
    uses_mtp_loss = True
    # Parameter-name substrings the stage never trains (e.g. "mtp." for DPO): the trainer freezes
    # them before DDP, so they keep their loaded values and get no gradient buffer or optimizer state.
    frozen_parameters: tuple[str, ...] = ()
    # Whether forward_step splits its packed micro-batch over CP ranks
    # (training.packing.split_for_context_parallel) and its loss is exact under that split.
    supports_context_parallel = False

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.datasets: dict[str, Any] = {}

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:  # noqa: B027 - optional hook, default no-op
        """Raise on a bad stage section or missing input before any process group or model exists."""
        del recipe

    @abstractmethod
    def build_datasets(self, train_samples: int, valid_samples: int) -> dict[str, Any]:
        """Map-style datasets keyed 'train' (and 'valid' when evaluation is on)."""

    @abstractmethod
    def forward_step(self, data_iterator: Iterator, model: torch.nn.Module) -> tuple[torch.Tensor, LossFunc]:
        """Megatron-Core's forward-step contract: the model output and a loss function of it."""

    # --- optional hooks, in the order the trainer calls them --------------------------------------
    # (A stage is extended here, never by subclassing the trainer: the trainer builds the stage
    # right after ``check_recipe``, before any process group, so every hook has the instance.)
    def configure_model(self, config: Any) -> None:  # noqa: B027 - optional hook, default no-op
        """Adjust Megatron-Core's TransformerConfig before the model is built (RL: routing replay)."""

    def on_model_built(self, trainer: Any) -> None:  # noqa: B027 - optional hook, default no-op
        """The model chunks exist (DDP-wrapped), before the optimizer and the checkpoint load
        (``trainer.start``: the checkpoint that load will read, if any)."""

    def setup(self, trainer: Any) -> None:
        """Called last in the trainer's construction: model, optimizer, checkpoint, datasets and
        logger all exist."""
        self.trainer = trainer

    def before_step(self, trainer: Any) -> None:  # noqa: B027 - optional hook, default no-op
        """Called before each optimizer step (RL generates rollouts here)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state

    def log_metrics(self) -> dict[str, float]:
        """Stage-specific metrics for the log line (e.g. DPO reward accuracies)."""
        return {}

    def write_checkpoint_extras(self, directory: Path) -> None:  # noqa: B027 - optional hook
        """Write into a checkpoint before it is committed (collective; QAT: ModelOpt state)."""

    def on_train_end(self, trainer: Any, result: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """After the last step and its checkpoint; may add entries to ``train()``'s result."""

    # --- shared --------------------------------------------------------------------------------
    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """One micro-batch from its samples; stages with ragged fields (SFT's cu_seqlens) override."""
        return collate(samples)

    def microbatches(self, split: str, start: int, num_microbatches: int) -> list[dict[str, torch.Tensor]]:
        dataset = self.datasets[split]
        mbs = self.recipe.train.micro_batch_size
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        index_lists = microbatch_indices(start, num_microbatches, mbs, dp_rank, dp_size, len(dataset))
        return [self.collate([dataset[i] for i in idx]) for idx in index_lists]
