"""Megatron-Core DDP around the model chunks, with the parameter layout the optimizer shards by.

ZeRO-1 (``parallel.distributed_optimizer``) is wired the way Megatron-LM's own training wires it
(``megatron/training/training.py``: ``wrap_model_chunks_with_ddp``): DDP runs with
``use_distributed_optimizer=True`` and is handed a precomputed ``full_param_layout``.

* AdamW: Megatron-Core's byte-level layout (``DistributedOptimizer.compute_full_param_layout``);
  gradients are reduce-scattered and every DP rank updates one contiguous slice of each buffer.
* Muon: the layer-wise layout.  ``tag_params_for_buffer_routing`` puts Muon's matrices and the
  AdamW parameters (embeddings, output head, norms, router bias) in separate buffers;
  ``LayerWiseDistributedOptimizer.compute_full_param_layout`` packs the Muon buffer so that every
  matrix lies whole inside one DP rank's shard (Newton-Schulz needs the whole matrix), and the
  AdamW buffer gets the byte-level layout.  The optimizer factory then builds a
  ``LayerWiseDistributedOptimizer`` over the Muon matrices and a separate ``DistributedOptimizer``
  over the rest; after the step both all-gather the updated parameters through DDP's buffers.

Without a layout, Megatron-Core falls back to its legacy layer-wise path (plain all-reduce, a
ping-pong assignment of matrices to ranks and a flatten/all-gather of the updated weights), which
production Megatron no longer takes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.layer_wise_optimizer import (
    LayerWiseDistributedOptimizer,
    tag_params_for_buffer_routing,
)
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import get_pg_size

from joyai_megatron.config.schema import ParallelCfg
from joyai_megatron.optim.builder import uses_distributed_optimizer


def _bucket_size(ddp_config: DistributedDataParallelConfig, dp_size: int, chunk_index: int) -> int | None:
    """The gradient-bucket size DDP itself will use for this chunk (one bucket without overlap;
    Megatron's default size with it; later virtual-pipeline chunks and pipeline stages after the
    first are not bucketed), so that the layout and DDP's buckets agree."""
    if not ddp_config.overlap_grad_reduce or chunk_index > 0:
        return None
    if parallel_state.get_pipeline_model_parallel_rank() > 0:
        return None
    return ddp_config.bucket_size or max(40_000_000, 1_000_000 * dp_size)


def wrap_in_ddp(
    chunks: list[torch.nn.Module], config: object, parallel: ParallelCfg, *, optimizer: str, world_size: int
) -> list[DistributedDataParallel]:
    distributed = uses_distributed_optimizer(parallel, world_size)
    layer_wise = distributed and optimizer == "muon"
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather,
        use_distributed_optimizer=distributed,
        average_in_collective=False,
    )
    if layer_wise:
        tag_params_for_buffer_routing(chunks)  # before DDP builds its buffers
        compute_layout = LayerWiseDistributedOptimizer.compute_full_param_layout
    elif distributed:
        compute_layout = DistributedOptimizer.compute_full_param_layout
    else:
        compute_layout = None
    groups = ProcessGroupCollection.use_mpu_process_groups()
    # Sized by the groups DDP reduce-scatters over (one optimizer instance: the whole DP x CP).
    dp_size = get_pg_size(groups.intra_dp_cp)
    expert_dp_size = get_pg_size(groups.intra_expt_dp)
    wrapped = []
    for i, chunk in enumerate(chunks):
        layout = None
        if compute_layout is not None:
            layout = compute_layout(
                [p for p in chunk.parameters() if p.requires_grad],
                _bucket_size(ddp_config, dp_size, i),
                dp_size,
                ddp_config,
                expert_data_parallel_world_size=expert_dp_size,
            )
        wrapped.append(
            DistributedDataParallel(
                config=config,
                ddp_config=ddp_config,
                module=chunk,
                disable_bucketing=i > 0,
                full_param_layout=layout,
            )
        )
    return wrapped


@contextmanager
def forward_pre_hooks_off(chunks: list[torch.nn.Module], *, param_sync: bool) -> Iterator[None]:
    """DDP's param all-gather pre-hooks (overlapped param gather) off, then back on every
    submodule. ``param_sync``: finish the all-gather first, so every parameter is current (a
    checkpoint save). Also the way to add submodules to a wrapped model (ModelOpt's quantizers):
    DDP hooks every submodule at wrap time and asserts each still has its hook when it turns them
    off; turning them back on covers the new ones."""
    hooked = [chunk for chunk in chunks if getattr(chunk, "use_forward_hook", False)]
    for chunk in hooked:
        chunk.disable_forward_pre_hook(param_sync=param_sync)
    try:
        yield
    finally:
        for chunk in hooked:
            chunk.enable_forward_pre_hook()
