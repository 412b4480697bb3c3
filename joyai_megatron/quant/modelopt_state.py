"""ModelOpt quantizers on Megatron-Core model chunks: insert, calibrate, toggle, save, restore.

Every function takes the bare ``GPTModel`` (unwrap DDP / Float16Module first): ModelOpt records its
state on the module it converted, and checkpoints name parameters relative to it.

Checkpoint layout (Megatron-LM's, through ModelOpt's ``mcore_dist_checkpointing`` plugin): the
per-module quantizer state (which quantizers are on, bits, block sizes) travels as each quantized
linear's ``_extra_state`` and calibrated ``amax`` values as sharded tensors, both inside the main
``torch_dist`` checkpoint; the global mode history (``quantize`` with its config, ``max_calibrate``)
sits in ``<iter_dir>/modelopt_state/``.  Restoring replays the modes, which re-inserts the
quantizers, before the main checkpoint is loaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

MODELOPT_STATE_DIR = "modelopt_state"


def leaf_quantizers(model: torch.nn.Module) -> Iterator[tuple[str, Any]]:
    """(name, TensorQuantizer) for every quantizer leaf (a SequentialQuantizer's stages included)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer):
            yield name, module


def enabled_quantizers(model: torch.nn.Module, kind: str | None = None) -> list[tuple[str, Any]]:
    """Enabled quantizer leaves; ``kind`` 'weight' or 'input' filters by role."""
    out = []
    for name, q in leaf_quantizers(model):
        if not q.is_enabled:
            continue
        if kind is None or f"{kind}_quantizer" in name:
            out.append((name, q))
    return out


def is_quantized(model: torch.nn.Module) -> bool:
    import modelopt.torch.opt as mto

    return mto.ModeloptStateManager.is_converted(model)


def _prepare_modelopt() -> None:
    """Before ModelOpt converts or restores a model: patch the one CUDA call its Megatron plugin
    hard-codes (on CPU, see compat/cpu.py), and teach it the ``local`` backend's replicated MLA
    down projections (compat/mla.py).

    ModelOpt quantizes an ``nn.Linear`` subclass only if it keeps ``nn.Linear.forward``; Megatron's
    replicated ``Linear`` returns ``(output, bias)``, so it is registered explicitly, as a Megatron
    parallel linear (quantizer amax saved in the distributed checkpoint, nothing sharded) whose
    quantizers wrap the ``F.linear`` call inside its forward.
    """
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.plugins.megatron import _MegatronParallelLinear

    from joyai_megatron import compat
    from joyai_megatron.compat.mla import ReplicatedLinear

    compat.install()
    if ReplicatedLinear in mtq.QuantModuleRegistry:
        return

    class _QuantReplicatedLinear(_MegatronParallelLinear):
        _functionals_to_replace = [(torch.nn.functional, "linear")]

        def _get_shard_axis_dict(self, state_dict: dict) -> dict:
            return {}  # replicated over TP: every amax is the whole module's

    mtq.QuantModuleRegistry.register({ReplicatedLinear: "joyai_ReplicatedLinear"})(_QuantReplicatedLinear)


def insert_quantizers(model: torch.nn.Module, config: dict[str, Any]) -> None:
    """Replace the linear layers by ModelOpt's quantized ones per ``config``, without calibrating.

    Calibration needs the trained weights and the data, which the trainer has only later; an
    uncalibrated weight quantizer already fake-quantizes with the block absmax of its input.
    """
    import modelopt.torch.quantization as mtq

    _prepare_modelopt()
    mtq.quantize(model, {**config, "algorithm": None}, forward_loop=None)
    if not enabled_quantizers(model, "weight"):
        raise RuntimeError(
            "ModelOpt inserted no enabled weight quantizer: every linear layer matched an exclusion "
            "(check qat.exclude)"
        )


@torch.no_grad()
def calibrate(
    model: torch.nn.Module, forward_loop: Callable[[torch.nn.Module], None], weight_amax: str
) -> None:
    """ModelOpt ``max`` calibration (weights from their values, activations from ``forward_loop``).

    ``weight_amax='dynamic'`` then drops the weight amax again, so each forward re-derives the
    block scales from the current master weights: the fake-quantized model is always exactly the
    round-to-nearest quantization of the weights being trained, and so is the export.
    """
    import modelopt.torch.quantization as mtq

    mtq.calibrate(model, algorithm="max", forward_loop=forward_loop)
    if weight_amax == "dynamic":
        for _, q in enabled_quantizers(model, "weight"):
            q.reset_amax()


@contextlib.contextmanager
def quantization_disabled(models: list[torch.nn.Module]) -> Iterator[None]:
    """Run the high-precision model: switch every enabled quantizer off, then back on."""
    switched = [q for m in models for _, q in enabled_quantizers(m)]
    for q in switched:
        q.disable()
    try:
        yield
    finally:
        for q in switched:
            q.enable()


def has_modelopt_state(iteration_dir: str | Path) -> bool:
    return (Path(iteration_dir) / MODELOPT_STATE_DIR).is_dir()


def save_state(model: torch.nn.Module, iteration_dir: str | Path) -> None:
    """Collective: write ``<iteration_dir>/modelopt_state`` (the main checkpoint holds the rest)."""
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import save_sharded_modelopt_state

    save_sharded_modelopt_state([model], str(iteration_dir))


def restore_state(model: torch.nn.Module, iteration_dir: str | Path) -> None:
    """Re-insert the quantizers recorded in ``iteration_dir`` (in place; weights load afterwards)."""
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import restore_sharded_modelopt_state

    if not has_modelopt_state(iteration_dir):
        raise FileNotFoundError(f"{iteration_dir}: no {MODELOPT_STATE_DIR}/ (not a QAT/PTQ checkpoint)")
    _prepare_modelopt()
    chunks = [model]
    restore_sharded_modelopt_state(chunks, str(iteration_dir))
    if chunks[0] is not model:
        raise RuntimeError("ModelOpt restored into a new module object; expected an in-place conversion")
    if not is_quantized(model):
        raise RuntimeError(f"{iteration_dir}/{MODELOPT_STATE_DIR} restored no quantization mode")


def summary(model: torch.nn.Module) -> str:
    """One line: how many weight / activation quantizers are on, and an example of each."""
    weights = enabled_quantizers(model, "weight")
    inputs = enabled_quantizers(model, "input")
    parts = [f"{len(weights)} weight quantizers"]
    if weights:
        parts[0] += f" (e.g. {weights[0][1]!r})"
    parts.append(f"{len(inputs)} activation quantizers")
    if inputs:
        parts[1] += f" (e.g. {inputs[0][1]!r})"
    return ", ".join(parts)
