"""HF-named tensors straight from a live Megatron model chunk (RL weight sync, QAT export).

A model chunk names its parameters locally: ``decoder.layers.i`` counts from this pipeline stage's
first layer and ``local_experts.j`` / ``weightj`` from this expert-parallel rank's first expert.
:func:`canonical_named_tensors` turns those into the table's global names (from each layer's
``layer_number`` and the experts' EP rank), and :func:`hf_named_tensors` maps them.  Tensor
parallelism is the caller's job: gather a TP-sharded parameter first (the sync does that with one
all-gather per tensor); a shard that does not have the full shape is refused, never mis-mapped.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from joyai_megatron.convert.common import ConversionError, fmt_shape
from joyai_megatron.convert.mapping import mapping_table, megatron_to_hf
from joyai_megatron.model.presets import ModelArch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_LOCAL_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.local_experts\.(\d+)\.(.*)$")
_GROUPED_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(linear_fc[12])\.weight(\d+)$")


def _expert_offset(model: torch.nn.Module, experts_path: str) -> int:
    experts = model.get_submodule(experts_path)
    group = getattr(experts, "ep_group", None)
    rank = group.rank() if group is not None else 0
    return rank * experts.num_local_experts


def _global_layer(model: torch.nn.Module, name: str) -> str:
    m = _LAYER.match(name)
    if not m:
        return name
    layer = model.decoder.layers[int(m.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}.{m.group(2)}"


def canonical_named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(global canonical name, tensor) of every parameter and router bias of one model chunk."""
    named = list(model.named_parameters())
    named += [(n, b) for n, b in model.named_buffers() if n.endswith("router.expert_bias")]
    offsets: dict[str, int] = {}
    for local_name, tensor in named:
        local = _LOCAL_EXPERT.match(local_name)
        grouped = _GROUPED_EXPERT.match(local_name)
        if local or grouped:
            path = (local or grouped).group(1)  # type: ignore[union-attr]
            if path not in offsets:
                offsets[path] = _expert_offset(model, path)
            prefix = _global_layer(model, path)
            if local:
                index, rest = int(local.group(2)), local.group(3)
            else:
                index, rest = int(grouped.group(3)), f"{grouped.group(2)}.weight"  # type: ignore[union-attr]
            yield f"{prefix}.local_experts.{index + offsets[path]}.{rest}", tensor
        else:
            yield _global_layer(model, local_name), tensor


def hf_named_tensors(
    model: torch.nn.Module, arch: ModelArch, include_mtp: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor view) for every tensor this chunk holds; MTP copies of embedding/head included."""
    table = mapping_table(arch, include_mtp)
    for name, tensor in canonical_named_tensors(model):
        row = table.row(name)
        if tuple(tensor.shape) != row.megatron_shape:
            raise ConversionError(
                f"{name}: local shape {fmt_shape(tensor.shape)} is not the full {fmt_shape(row.megatron_shape)}; "
                "gather tensor-parallel shards before mapping"
            )
        yield from megatron_to_hf(name, tensor.detach(), arch, include_mtp)
