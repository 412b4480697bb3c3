"""A frozen reference policy for preference training: built, loaded, run forward-only, or stored.

The reference is the starting checkpoint's weights.  It is either kept live (a second copy of the
model chunks, no DDP, no gradients, same layout and precision as the policy, run through
Megatron-Core's forward-only pipeline schedule) or used once to precompute every pair's
log-probabilities into a file, after which it is freed.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from joyai_megatron.model.build import build_model_chunks
from joyai_megatron.training import checkpoint as ckpt
from joyai_megatron.training.stage import microbatch_indices

REFERENCE_FORMAT = "joyai-dpo-reference-logps/1"
ForwardStep = Callable[[Any, torch.nn.Module], tuple[torch.Tensor, Callable]]


def build_frozen_copy(trainer: Any, checkpoint: str | os.PathLike) -> list[torch.nn.Module]:
    """Model chunks shaped like ``trainer.model`` holding ``checkpoint``'s weights, frozen.

    Built with ``perform_initialization=False`` (every tensor is overwritten by the load, and
    skipping init leaves the RNG streams of the run untouched) on a private copy of the config
    without the policy's DDP hooks.
    """
    config = copy.copy(trainer.config)
    config.perform_initialization = False
    for hook in ("no_sync_func", "param_sync_func", "finalize_model_grads_func", "grad_scale_func"):
        setattr(config, hook, None)
    chunks = build_model_chunks(
        config,
        trainer.arch,
        trainer.recipe.model.backend,
        vpp=trainer.layout.vpp,
        seq_length=trainer.recipe.train.seq_length,
        grouped_gemm_impl=trainer.recipe.model.moe_grouped_gemm_impl,
    )
    for model in chunks:
        model.requires_grad_(False)
        model.eval()
    ckpt.load_model_weights(chunks, ckpt.resolve_checkpoint(checkpoint))
    return chunks


def forward_only(
    chunks: list[torch.nn.Module], forward_step: ForwardStep, batches: list[dict], recipe: Any
) -> list[dict[str, torch.Tensor]]:
    """Megatron-Core's forward-only schedule over ``batches``: the loss functions' dicts, in
    micro-batch order, on the last pipeline stage (an empty list elsewhere)."""
    if not batches:
        return []
    t = recipe.train
    iterators = [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)
    with torch.no_grad():
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators,
            model=chunks,
            num_microbatches=len(batches),
            seq_length=t.seq_length * t.micro_batch_size,
            micro_batch_size=1,
            decoder_seq_length=t.seq_length * t.micro_batch_size,
            forward_only=True,
        )


def _is_result_rank() -> bool:
    """One rank per data-parallel replica holds each micro-batch's outputs."""
    return (
        parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_context_parallel_rank() == 0
        and parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    )


def precompute(
    chunks: list[torch.nn.Module],
    forward_step: ForwardStep,
    dataset: Any,
    collate: Callable[[Sequence[dict]], dict],
    recipe: Any,
    num_microbatches: int,
    key: str = "ref_logps",
) -> torch.Tensor:
    """``[len(dataset), k]`` values of the loss dicts' ``key`` for every sample, in dataset order,
    on every rank.  Samples are split over data-parallel ranks like training batches."""
    n, mbs = len(dataset), recipe.train.micro_batch_size
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    sums: torch.Tensor | None = None
    counts = torch.zeros(n, dtype=torch.float64)
    for start in range(0, n, num_microbatches * mbs * dp_size):
        index_lists = microbatch_indices(start, num_microbatches, mbs, dp_rank, dp_size, n)
        outputs = forward_only(
            chunks, forward_step, [collate([dataset[i] for i in idx]) for idx in index_lists], recipe
        )
        if not _is_result_rank():
            continue
        for idx, out in zip(index_lists, outputs, strict=True):
            values = out[key].detach().double().cpu().reshape(len(idx), -1)
            if sums is None:
                sums = torch.zeros(n, values.shape[1], dtype=torch.float64)
            for row, i in enumerate(idx):
                sums[i] += values[row]
                counts[i] += 1
    width = torch.tensor([0 if sums is None else sums.shape[1]], dtype=torch.long)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    sums = torch.zeros(n, int(width), dtype=torch.float64) if sums is None else sums
    packed = torch.cat([sums, counts[:, None]], dim=1)
    if torch.cuda.is_available():
        packed = packed.cuda()  # gpu-only
    dist.all_reduce(packed)
    packed = packed.cpu()
    if (packed[:, -1] == 0).any():
        missing = int(torch.nonzero(packed[:, -1] == 0)[0])
        raise RuntimeError(f"reference pass produced no value for sample {missing} of {n}")
    return packed[:, :-1] / packed[:, -1:]


def save_reference_logps(path: str | os.PathLike, values: dict[str, torch.Tensor], meta: dict) -> None:
    """Rank 0 writes ``{meta, values}`` atomically; every rank waits for it."""
    path = Path(path)
    if dist.get_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"format": REFERENCE_FORMAT, "meta": meta, "values": values}, tmp)
        os.replace(tmp, path)
    dist.barrier()


def load_reference_logps(path: str | os.PathLike, meta: dict) -> dict[str, torch.Tensor]:
    """The stored values, after checking they were made for this data and reference."""
    stored = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(stored, dict) or stored.get("format") != REFERENCE_FORMAT:
        raise ValueError(f"{path}: not a reference log-prob file ({REFERENCE_FORMAT})")
    diff = {k: (stored["meta"].get(k), v) for k, v in meta.items() if stored["meta"].get(k) != v}
    if diff:
        details = "; ".join(f"{k}: file has {a!r}, run needs {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"{path} was computed for other data or another reference ({details}); delete it to recompute "
            "(possible only before the first DPO step) or point dpo.reference_logps elsewhere"
        )
    return stored["values"]
