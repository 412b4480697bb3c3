"""Weighted average of ``torch_dist`` checkpoints of one architecture (model weights only).

JoyAI's stage 4 simulates learning-rate decay by merging checkpoints instead of annealing (docs/
pretraining.md, "Merging checkpoints").  The checkpoints may come from runs with different TP/EP/PP
layouts: Megatron stores every tensor under its global key and shape, so each region of the output
is read from every input with :class:`DistCkptReader` (which reassembles it from whatever chunks that
layout saved), accumulated in fp32 and written in the first checkpoint's dtype.  The output follows
the first checkpoint's chunking and is produced chunk by chunk while DCP's writer threads ask for it:
peak memory is about ``threads x (inputs + 1)`` times the largest stored chunk, never a model.

The output holds the model tensors and the first checkpoint's resolved recipe, no optimizer,
scheduler or ``train_state.json``: any stage loads it as weights (``checkpoint.load``) and starts
a fresh optimizer; TE's FP8 ``_extra_state`` starts fresh too (stored as ``None``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from joyai_megatron.config.recipe import save_resolved_recipe
from joyai_megatron.config.schema import Recipe
from joyai_megatron.convert.common import ConversionError, atomic_output_dir, fmt_shape
from joyai_megatron.convert.dist_ckpt import (
    MODEL_KEY_PREFIXES,
    TRACKER_FILE,
    ChunkToWrite,
    DistCkptReader,
    write_dist_checkpoint,
)
from joyai_megatron.model.presets import recipe_arch
from joyai_megatron.training.checkpoint_model import load_checkpoint_recipe
from joyai_megatron.training.checkpoint_scan import seal


@dataclass(frozen=True)
class MergeInput:
    path: Path
    iteration: int | None
    weight: float


@dataclass(frozen=True)
class MergeResult:
    output: Path
    iteration_dir: Path
    inputs: list[MergeInput]
    tensors: int
    bytes: int
    seconds: float


def parse_checkpoint_arg(text: str) -> tuple[str, float | None]:
    """``DIR`` or ``DIR:WEIGHT`` (the last colon separates the weight, so paths may contain colons)."""
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, None


def _iteration(iteration_dir: Path) -> int | None:
    name = iteration_dir.name
    return int(name[len("iter_") :]) if name.startswith("iter_") and name[5:].isdigit() else None


def ema_weights(iterations: Sequence[int], decay: float) -> list[float]:
    """Weights of an exponential moving average, decay ``decay`` per step, over the snapshots.

    The first checkpoint starts the average; each later one at ``t_i`` is folded in as
    ``avg <- d * avg + (1 - d) * x_i`` with ``d = decay ** (t_i - t_{i-1})``, so a snapshot's weight
    falls with the steps since it was taken, as in a per-step EMA.  The weights sum to one.
    """
    if not 0.0 < decay < 1.0:
        raise ConversionError(f"EMA decay must be in (0, 1), got {decay}")
    if any(b <= a for a, b in zip(iterations, iterations[1:], strict=False)):
        raise ConversionError(f"EMA weights need strictly increasing iterations, got {list(iterations)}")
    weights = [1.0]
    for prev, cur in zip(iterations, iterations[1:], strict=False):
        d = decay ** (cur - prev)
        weights = [w * d for w in weights] + [1.0 - d]
    return weights


def resolve_inputs(
    checkpoints: Sequence[tuple[str | os.PathLike, float | None]], ema_decay: float | None = None
) -> list[MergeInput]:
    """Iteration directories and weights: all given, EMA from iterations, or uniform."""
    if not checkpoints:
        raise ConversionError("merge needs at least one checkpoint")
    readers_paths = [DistCkptReader(p).path for p, _ in checkpoints]
    given = [w for _, w in checkpoints]
    iterations = [_iteration(p) for p in readers_paths]
    if ema_decay is not None:
        if any(w is not None for w in given):
            raise ConversionError("give either per-checkpoint weights or --ema-decay, not both")
        if any(i is None for i in iterations):
            raise ConversionError("--ema-decay needs iter_* checkpoints (their iteration numbers)")
        weights = ema_weights([int(i) for i in iterations], ema_decay)  # type: ignore[arg-type]
    elif all(w is None for w in given):
        weights = [1.0 / len(checkpoints)] * len(checkpoints)
    elif any(w is None for w in given):
        raise ConversionError("give a weight for every checkpoint (DIR:WEIGHT) or for none (uniform)")
    else:
        weights = [float(w) for w in given]  # type: ignore[arg-type]
    return [MergeInput(p, i, w) for p, i, w in zip(readers_paths, iterations, weights, strict=True)]


def check_same_architecture(readers: Sequence[DistCkptReader]) -> list[str]:
    """The model tensor keys every checkpoint holds with the same global shape; else an error naming one."""
    first = readers[0]
    keys = sorted(first.model_keys())
    for other in readers[1:]:
        missing = sorted(set(keys) - set(other.model_keys()))
        extra = sorted(set(other.model_keys()) - set(keys))
        if missing or extra:
            name = (missing or extra)[0]
            where = other.path if missing else first.path
            raise ConversionError(
                f"different architectures: {where} has no tensor {name} "
                f"({len(missing)} missing, {len(extra)} extra vs {first.path})"
            )
        for key in keys:
            a, b = first.tensors[key], other.tensors[key]
            if a.shape != b.shape:
                raise ConversionError(
                    f"different architectures: {key} is {fmt_shape(a.shape)} in {first.path} "
                    f"but {fmt_shape(b.shape)} in {other.path}"
                )
            if a.dtype.is_floating_point != b.dtype.is_floating_point:
                raise ConversionError(f"{key}: {a.dtype} in {first.path} but {b.dtype} in {other.path}")
    archs = [recipe_arch(load_checkpoint_recipe(r.path)) for r in readers]
    for reader, arch in zip(readers[1:], archs[1:], strict=True):
        diff = {k: (v, getattr(arch, k)) for k, v in asdict(archs[0]).items() if getattr(arch, k) != v}
        if diff:
            raise ConversionError(f"different architectures: {reader.path} vs {first.path} differ in {diff}")
    return keys


_SLAB = 1 << 24  # elements summed in fp32 at a time: the fp32 temporaries stay at 64 MB per thread


def _merged_region(
    readers: Sequence[DistCkptReader], weights: Sequence[float], key: str, offsets: tuple, sizes: tuple
) -> torch.Tensor:
    """``sum_i w_i * x_i`` over one region, in fp32 (``a*x + b*y``: multiply, then add, per element).

    The inputs' regions are held in their stored dtype and summed slab by slab, so a region costs
    ``inputs + 1`` times its stored bytes, not fp32 copies of each.
    """
    out_dtype = readers[0].tensors[key].dtype
    values = [r.read(key, offsets, sizes) for r in readers]
    if not out_dtype.is_floating_point:  # integer state is not averaged: it must agree
        for r, v in zip(readers[1:], values[1:], strict=True):
            if not torch.equal(values[0], v):
                raise ConversionError(f"{key}: integer tensor differs between {readers[0].path} and {r.path}")
        return values[0]
    out = torch.empty(sizes, dtype=out_dtype)
    flat_out, flats = out.view(-1), [v.reshape(-1) for v in values]
    for start in range(0, flat_out.numel(), _SLAB):
        end = min(start + _SLAB, flat_out.numel())
        acc = flats[0][start:end].float() * weights[0]
        for flat, weight in zip(flats[1:], weights[1:], strict=True):
            acc += flat[start:end].float() * weight
        flat_out[start:end] = acc
    return out


def plan_merge(
    readers: Sequence[DistCkptReader], weights: Sequence[float], keys: Sequence[str]
) -> list[ChunkToWrite]:
    """One output chunk per stored chunk of the first checkpoint, merged when the writer asks."""
    first = readers[0]
    chunks = []
    for key in keys:
        info = first.tensors[key]
        for stored in first.metadata.state_dict_metadata[key].chunks:
            offsets, sizes = tuple(stored.offsets), tuple(stored.sizes)

            def load(key: str = key, offsets: tuple = offsets, sizes: tuple = sizes) -> torch.Tensor:
                return _merged_region(readers, weights, key, offsets, sizes)

            chunks.append(ChunkToWrite(key, offsets, sizes, info.shape, info.dtype, load))
    return chunks


def fresh_extra_state(reader: DistCkptReader) -> dict[str, object]:
    """The model's ``_extra_state`` object keys, valued ``None`` (fresh FP8 metadata on load)."""
    return {
        k: None
        for k in reader.metadata.state_dict_metadata
        if k.startswith(MODEL_KEY_PREFIXES) and "._extra_state/" in k
    }


def merge_checkpoints(
    checkpoints: Sequence[tuple[str | os.PathLike, float | None]],
    output: str | os.PathLike,
    *,
    ema_decay: float | None = None,
    iteration: int | None = None,
    threads: int = 4,
    overwrite: bool = False,
    progress: bool = True,
) -> MergeResult:
    """Write ``sum_i w_i * checkpoint_i`` to ``<output>/iter_<iteration>/`` + the tracker, atomically.

    ``iteration`` defaults to the newest input's, so the merge sorts after what it averages.
    """
    start = time.perf_counter()
    inputs = resolve_inputs(checkpoints, ema_decay)
    readers = [DistCkptReader(i.path) for i in inputs]
    weights = [i.weight for i in inputs]
    keys = check_same_architecture(readers)
    chunks = plan_merge(readers, weights, keys)
    total = sum(math.prod(c.sizes) * c.dtype.itemsize for c in chunks)
    if iteration is None:
        iteration = max((i.iteration or 0) for i in inputs)
    iter_name = f"iter_{iteration:07d}"
    with atomic_output_dir(output, overwrite) as tmp:
        with tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merge", disable=not progress
        ) as bar:
            write_dist_checkpoint(
                tmp / iter_name,
                chunks,
                fresh_extra_state(readers[0]),
                threads=threads,
                on_write=bar.update,
                file_per_chunk=True,
            )
        save_resolved_recipe(_merged_recipe(readers[0].path, Path(output).resolve()), tmp / iter_name)
        sources = [{"path": str(i.path), "iteration": i.iteration, "weight": i.weight} for i in inputs]
        (tmp / iter_name / "merge.json").write_text(
            json.dumps({"sources": sources, "ema_decay": ema_decay}, indent=1)
        )
        seal(tmp / iter_name, iteration, threads)
        (tmp / TRACKER_FILE).write_text(str(iteration))
    out = Path(output).resolve()
    return MergeResult(out, out / iter_name, inputs, len(keys), total, time.perf_counter() - start)


def _merged_recipe(first: Path, output: Path) -> Recipe:
    """The first input's resolved recipe, its checkpoint and log directories pointed at the merge."""
    recipe = load_checkpoint_recipe(first)
    recipe.checkpoint.dir = str(output)
    recipe.logging.dir = str(output / "logs")
    return recipe
