"""A QAT checkpoint rebuilt on one process, quantizers and all: what export and its reload check load.

The model is rebuilt by :func:`joyai_megatron.training.checkpoint_model.rebuild_model` with the
checkpoint's recipe, backend, dtype and seed; its quantizers are restored from ``modelopt_state/``
before Megatron's loader fills the weights (and the calibrated amax).
"""

from __future__ import annotations

import os

from joyai_megatron.config.schema import Recipe
from joyai_megatron.convert.common import ConversionError
from joyai_megatron.quant import modelopt_state as mos
from joyai_megatron.training.checkpoint_model import CheckpointModel, load_checkpoint_recipe, rebuild_model

# A QAT checkpoint on one process: ``model``, ``recipe``, ``arch``, ``iteration_dir``.
QATModel = CheckpointModel


def load_qat_model(checkpoint: str | os.PathLike, include_mtp: bool = True) -> QATModel:
    """Rebuild the checkpoint's model with its quantizers and weights (single process)."""
    from joyai_megatron.convert.dist_ckpt import resolve_iteration_dir

    iteration_dir = resolve_iteration_dir(checkpoint)
    if not mos.has_modelopt_state(iteration_dir):
        raise ConversionError(
            f"{iteration_dir} has no {mos.MODELOPT_STATE_DIR}/: not a QAT checkpoint "
            "(export unquantized checkpoints with python -m joyai_megatron.convert to-hf)"
        )
    loaded = rebuild_model(iteration_dir, as_trained=True, before_load=mos.restore_state)
    if not include_mtp:
        loaded.arch = loaded.arch.replace(mtp_num_layers=0)
    return loaded


def checkpoint_recipe(checkpoint: str | os.PathLike) -> Recipe:
    """The recipe saved beside a checkpoint, read without building anything."""
    from joyai_megatron.convert.dist_ckpt import resolve_iteration_dir

    return load_checkpoint_recipe(resolve_iteration_dir(checkpoint))
