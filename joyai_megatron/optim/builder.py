"""Muon (Moonlight recipe) or AdamW through Megatron-Core's optimizer factory.

Megatron-Core 0.19 routes ``optimizer="muon"`` to the ``emerging-optimizers`` package and splits
parameters itself: 2-D weights go to Muon, while embeddings, the output head and every non-2-D
tensor (norms, router bias) go to the scalar optimizer (AdamW).  With
``parallel.distributed_optimizer`` the Muon part becomes the layer-wise distributed optimizer
(ZeRO-1 for Muon: each rank orthogonalises whole matrices it owns).
"""

from __future__ import annotations

import re
import typing

import torch
from emerging_optimizers.orthogonalized_optimizers.muon_utils import NSCoeffT
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer import MegatronOptimizer

from joyai_megatron.config.schema import OptimCfg, ParallelCfg, PrecisionCfg
from joyai_megatron.optim.muon import GATED_FC1

OPTIMIZERS = ("muon", "adam")
# optim.* keys passed to Megatron-Core's OptimizerConfig under the same name.
SAME_NAME = (
    *("lr", "min_lr", "weight_decay", "clip_grad", "adam_beta1", "adam_beta2", "adam_eps"),
    *("muon_momentum", "muon_nesterov", "muon_num_ns_steps", "muon_scale_mode"),
    *("muon_extra_scale_factor", "muon_split_qkv", "muon_tp_mode", "muon_coefficient_type"),
)
# A gated MLP's fused fc1: MLP/TE linears (``linear_fc1.weight``), TE grouped experts (``weightE``).
GATED_FC1_NAME = re.compile(r"(^|\.)linear_fc1\.weight\d*$")
# Parameter attributes BatchedMuon reads that Megatron-Core's fp32 main-param copies do not carry
# (they copy the TP attributes, ``allreduce`` and ``shared`` only).
MUON_ATTRIBUTES = (GATED_FC1, "expert_tp")
# Named Newton-Schulz coefficient sets ("custom" needs sets no recipe key can give).
COEFFICIENT_TYPES = tuple(name for name in typing.get_args(NSCoeffT) if name != "custom")


def uses_distributed_optimizer(parallel: ParallelCfg, world_size: int) -> bool:
    """ZeRO-1 is on when the recipe asks for it and there is more than one process.

    The optimizer and the DDP wrapper (``training/ddp.py``) must agree on this; both call it."""
    return parallel.distributed_optimizer and world_size > 1


def optimizer_config(optim: OptimCfg, parallel: ParallelCfg, precision: PrecisionCfg) -> OptimizerConfig:
    """Moonlight's settings by default: Nesterov momentum 0.95, 5 Newton-Schulz steps, spectral
    scale sqrt(max(rows, cols)) times 0.2 so AdamW's LR and weight decay carry over, wd 0.1."""
    if optim.optimizer not in OPTIMIZERS:
        raise ValueError(f"optim.optimizer must be one of {OPTIMIZERS}, got {optim.optimizer!r}")
    muon = optim.optimizer == "muon"
    if optim.muon_coefficient_type not in COEFFICIENT_TYPES:
        raise ValueError(
            f"optim.muon_coefficient_type must be one of {COEFFICIENT_TYPES}, "
            f"got {optim.muon_coefficient_type!r}"
        )
    distributed = uses_distributed_optimizer(parallel, torch.distributed.get_world_size())
    return OptimizerConfig(
        optimizer=optim.optimizer,
        **{key: getattr(optim, key) for key in SAME_NAME},
        decoupled_weight_decay=True,
        bf16=precision.dtype == "bf16",
        fp16=precision.dtype == "fp16",
        params_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision.dtype, torch.float32),
        use_distributed_optimizer=distributed and not muon,
        use_layer_wise_distributed_optimizer=distributed and muon,
        overlap_param_gather_with_optimizer_step=False,
        muon_scalar_optimizer="adam",
    )


def build_optimizer(
    optim: OptimCfg, parallel: ParallelCfg, precision: PrecisionCfg, model_chunks: list
) -> MegatronOptimizer:
    """Megatron-Core's optimizer for the recipe; BatchedMuon, the multi-tensor and ZeRO-1 patches
    it relies on are installed with the process groups (``joyai_megatron.compat``)."""
    config = optimizer_config(optim, parallel, precision)
    tag_gated_fc1(model_chunks, optim.optimizer == "muon" and optim.muon_split_fc1)
    optimizer = get_megatron_optimizer(config, model_chunks)
    _carry_muon_attributes(model_chunks)
    return optimizer


def tag_gated_fc1(model_chunks: list, split: bool) -> None:
    """Mark (or, with ``split`` off, unmark) every gated MLP's fused fc1 weight for BatchedMuon's
    gate/up split."""
    gated = model_chunks[0].config.gated_linear_unit
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            on = split and gated and param.ndim == 2 and GATED_FC1_NAME.search(name) is not None
            setattr(param, GATED_FC1, on)


def _carry_muon_attributes(model_chunks: list) -> None:
    """Copy the Muon attributes to the fp32 main params a bf16 optimizer updates instead."""
    for chunk in model_chunks:
        for param in chunk.parameters():
            main = getattr(param, "main_param", None)
            if main is None:
                continue
            for attribute in MUON_ATTRIBUTES:
                if hasattr(param, attribute):
                    setattr(main, attribute, getattr(param, attribute))


def _leaf_optimizers(optimizer: MegatronOptimizer) -> list:
    children = getattr(optimizer, "chained_optimizers", None)
    if children is None:
        return [optimizer]
    return [leaf for child in children for leaf in _leaf_optimizers(child)]


def parameter_split(optimizer: MegatronOptimizer, model_chunks: list) -> dict[str, list[str]]:
    """Names of the parameters each underlying torch optimizer updates, keyed by its class name.

    Used by tests and at start-up logging to show which tensors Muon orthogonalises.
    """
    names = {id(p): n for chunk in model_chunks for n, p in chunk.named_parameters()}
    split: dict[str, list[str]] = {}
    for leaf in _leaf_optimizers(optimizer):
        inner = getattr(leaf, "optimizer", leaf)
        key = type(inner).__name__
        for group in inner.param_groups:
            for p in group["params"]:
                model_param = getattr(p, "_model_param", None)
                name = names.get(id(p)) or (names.get(id(model_param)) if model_param is not None else None)
                if name is None:
                    name = _main_param_owner(leaf, p, names)
                split.setdefault(key, []).append(name)
    return split


def _main_param_owner(leaf: object, param: torch.Tensor, names: dict[int, str]) -> str:
    """Float16 optimizers keep fp32 copies; map a copy back to the model parameter's name."""
    groups = getattr(leaf, "float16_groups", None)
    copies = getattr(leaf, "fp32_from_float16_groups", None)
    if groups and copies:
        for model_group, copy_group in zip(groups, copies, strict=True):
            for model_param, copy in zip(model_group, copy_group, strict=True):
                if copy is param:
                    return names.get(id(model_param), "<unnamed>")
    return "<unnamed>"
