"""Stream the live Megatron model as full HF-checkpoint-named tensors (the rollout weight sync).

Per parameter: gather its tensor-parallel shards (one all-gather in the TP or expert-TP group;
SwiGLU ``linear_fc1`` shards are [gate_r; up_r] per rank and are regrouped as [gate; up]), then
map it through the conversion table (:func:`joyai_megatron.convert.live.hf_named_tensors`'s
naming: global layer and expert indices).  Pipeline stages and expert-parallel ranks each hold
part of the model; :func:`full_model_hf_weights` merges those parts by broadcasting one tensor at a
time from its owner, for engines fed the whole model from one process.  The tensors are detached views or gathered
copies; engines copy them into their own storage.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from joyai_megatron.convert.live import canonical_named_tensors
from joyai_megatron.convert.mapping import megatron_to_hf
from joyai_megatron.model.presets import ModelArch
from joyai_megatron.training.checkpoint import unwrap


def _tp_group(param: torch.Tensor) -> dist.ProcessGroup | None:
    if not getattr(param, "tensor_model_parallel", False):
        return None
    if not getattr(param, "allreduce", True):  # expert parameter: expert-TP group
        group = parallel_state.get_expert_tensor_parallel_group(check_initialized=False)
    else:
        group = parallel_state.get_tensor_model_parallel_group()
    return group if group is not None and dist.get_world_size(group) > 1 else None


def gather_tensor_parallel(name: str, param: torch.Tensor) -> torch.Tensor:
    """The full tensor of a (possibly) TP-sharded parameter."""
    group = _tp_group(param)
    tensor = param.detach()
    if group is None:
        return tensor
    dim = param.partition_dim
    shards = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, tensor.contiguous(), group=group)
    if "linear_fc1" in name and dim == 0:  # SwiGLU: each shard is [gate_r; up_r]
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=dim)


def chunk_hf_weights(
    chunk: torch.nn.Module, arch: ModelArch, include_mtp: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) of every tensor one model chunk holds (TP-gathered)."""
    for name, tensor in canonical_named_tensors(unwrap(chunk)):
        yield from megatron_to_hf(name, gather_tensor_parallel(name, tensor), arch, include_mtp)


def model_hf_weights(
    chunks: list[torch.nn.Module], arch: ModelArch, include_mtp: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """This rank's part of the model (all its chunks), TP-gathered, as HF tensors."""
    for chunk in chunks:
        yield from chunk_hf_weights(chunk, arch, include_mtp)


def full_model_hf_weights(
    chunks: list[torch.nn.Module], arch: ModelArch, include_mtp: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every HF tensor of the model on every rank: merges pipeline stages and expert-parallel ranks.

    With PP = EP = 1 this is :func:`model_hf_weights` (no communication beyond TP). Otherwise the
    ranks first exchange only names, shapes and dtypes; then each tensor is broadcast from the
    first rank that holds it, one tensor at a time, so no rank ever holds more than its own part
    plus one tensor in flight.
    """
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    if pp == 1 and ep == 1:
        yield from model_hf_weights(chunks, arch, include_mtp)
        return
    mine = dict(model_hf_weights(chunks, arch, include_mtp))
    meta = {n: (tuple(t.shape), t.dtype) for n, t in mine.items()}
    gathered: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, meta)
    owners: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
    for rank, part in enumerate(gathered):
        for name, (shape, dtype) in (part or {}).items():
            owners.setdefault(name, (rank, shape, dtype))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    for name in sorted(owners):
        rank, shape, dtype = owners[name]
        if rank == dist.get_rank():
            tensor = mine[name].contiguous()
        else:
            tensor = torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(tensor, src=rank)
        yield name, tensor
