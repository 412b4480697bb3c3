"""Atomic, resharding-capable checkpoints on Megatron ``dist_checkpointing`` (``torch_dist``).

Layout of ``checkpoint.dir``::

    iter_0000100/                       one complete checkpoint (model, optimizer, scheduler, RNG,
        recipe.yaml, train_state.json   trainer and data state) plus the resolved recipe
    latest_checkpointed_iteration.txt   the newest complete step, written last

Every rank writes into ``iter_XXXXXXX.tmp`` and hashes the files it wrote; only after all ranks
finished does rank 0 write ``checksums.json`` and ``COMPLETE``, rename the directory and update the
tracker file, so a kill at any moment leaves either the previous checkpoint or the new one, never a
partial directory that resume would pick up.  Resume checks the checksums before loading (see
``checkpoint_scan.py`` for how the checkpoint to resume is chosen).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint.api import CheckpointException

from joyai_megatron.checksums import (
    MANIFEST,
    ManifestError,
    check_files,
    digest_files,
    files_to_hash,
    read_manifest,
    write_manifest,
)
from joyai_megatron.config.recipe import save_resolved_recipe
from joyai_megatron.config.schema import Recipe
from joyai_megatron.errors import disk_full_error, is_disk_full
from joyai_megatron.training.checkpoint_scan import COMPLETE, damaged_checkpoint_error, scan
from joyai_megatron.training.checkpoint_scan import TRACKER as TRACKER  # re-exported: callers' home
from joyai_megatron.training.checkpoint_scan import iter_dir as iter_dir
from joyai_megatron.training.checkpoint_scan import resolve_checkpoint as resolve_checkpoint
from joyai_megatron.training.optimizer_state import OPTIMIZER_METADATA, OptimizerLoad


@dataclass
class TrainState:
    """Counters restored on resume; together with the seed they fix the data position."""

    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    stage: dict[str, Any] = field(default_factory=dict)


def latest_iteration(root: str | os.PathLike) -> int | None:
    """The newest *complete* checkpoint's step (its ``COMPLETE`` marker, whatever the tracker says)."""
    return scan(root).newest


def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {
        "random": random.getstate(),
        "np": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _rng_sharded_object() -> ShardedObject:
    """Per-rank RNG, keyed by (pp, tp, dp) so a different layout simply does not find it."""
    pp = parallel_state.get_pipeline_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_rank()
    dp = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    dp_size = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
    layout = f"pp{pp_size}_tp{tp_size}_dp{dp_size}_ep{parallel_state.get_expert_model_parallel_world_size()}"
    return ShardedObject(
        f"rng_state.{layout}", _rng_state(), (pp_size, tp_size, dp_size), (pp, tp, dp), replica_id=0
    )


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers: checkpoints hold its names."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


# TE modules' `_extra_state` (FP8 metadata) is absent from checkpoints written by the local backend
# or by `convert from-hf`; a fresh one is fine.
_FRESH_OK = ["_extra_state"]


def model_sharded_state_dict(model: list) -> dict[str, Any]:
    if len(model) == 1:
        return {"model": unwrap(model[0]).sharded_state_dict()}
    return {f"model{i}": unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(model)}


def load_model_weights(model: torch.nn.Module | list[torch.nn.Module], path: str | os.PathLike) -> None:
    """Model tensors only (no optimizer, RNG or counters) from one complete ``iter_*`` directory.

    ``model``: one module or the chunks of a pipeline rank (wrappers allowed); every one of their
    tensors must be in the checkpoint (strict), which may hold more (optimizer, RNG, counters), except
    TE's ``_extra_state`` (FP8 metadata), which checkpoints of the local backend do not have.
    """
    chunks = model if isinstance(model, list) else [model]
    path = Path(path)
    state = model_sharded_state_dict(chunks)
    _drop_missing(state, _saved_keys(path), _FRESH_OK)
    loaded = dist_checkpointing.load(state, str(path), strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for key, chunk in zip(keys, chunks, strict=True):
        _load_model_chunk(unwrap(chunk), loaded[key], _FRESH_OK, path)


def _full_sharded_state_dict(
    model: list, optimizer: Any, scheduler: Any, is_loading: bool, with_optim: bool
) -> dict:
    state = model_sharded_state_dict(model)
    if with_optim and optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=is_loading, metadata=OPTIMIZER_METADATA
        )
        state["scheduler"] = scheduler.state_dict()
    state["rng_state"] = _rng_sharded_object()
    return state


def save_checkpoint(
    root: str | os.PathLike,
    recipe: Recipe,
    model: list,
    optimizer: Any,
    scheduler: Any,
    train_state: TrainState,
    keep_last: int,
    write_extras: Callable[[Path], None] | None = None,
    async_queue: Any | None = None,
) -> Path:
    """Collective: every rank calls it.  Returns the final ``iter_*`` directory.

    ``write_extras(tmp_dir)`` (collective too) adds files that must be committed atomically with
    the checkpoint, e.g. the QAT stage's sharded ModelOpt state.  With ``async_queue`` (an
    ``AsyncCallsQueue``) the tensors are copied to host memory here and written by a background
    process while training continues; the rename and tracker update happen when the queue
    finalises the write on every rank (``maybe_finalize_async_calls``).
    """
    rank = dist.get_rank()
    final = iter_dir(root, train_state.iteration)
    tmp = final.with_name(final.name + ".tmp")
    try:
        if rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        dist.barrier()
        state = _full_sharded_state_dict(model, optimizer, scheduler, is_loading=False, with_optim=True)
        commit = functools.partial(_commit, Path(root), tmp, final, recipe, replace(train_state), keep_last)
        if async_queue is not None:
            request = dist_checkpointing.save(
                state, str(tmp), content_metadata=OPTIMIZER_METADATA, async_sharded_save=True, async_strategy="mcore"
            )
            if write_extras is not None:
                write_extras(tmp)
            request.add_finalize_fn(commit)
            async_queue.schedule_async_request(request)
            return final
        dist_checkpointing.save(state, str(tmp), content_metadata=OPTIMIZER_METADATA)
        if write_extras is not None:
            write_extras(tmp)
        dist.barrier()
        commit()
        dist.barrier()
    except (Exception, CheckpointException) as err:  # DCP's exception is a BaseException
        if is_disk_full(err, tmp):
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise disk_full_error(tmp, err) from err
        raise
    return final


def _commit(root: Path, tmp: Path, final: Path, recipe: Recipe, train_state: TrainState, keep_last: int) -> None:
    """Make a fully written ``tmp`` the newest checkpoint (collective).

    Every rank hashes the shard files it wrote (``__<rank>_*.distcp``, still in the page cache);
    rank 0 hashes the rest and writes metadata, ``checksums.json`` and ``COMPLETE``, then renames
    and updates the tracker.
    """
    rank = dist.get_rank()
    gathered: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digest_files(tmp, sorted(p.name for p in tmp.glob(f"__{rank}_*.distcp"))))
    if rank != 0:
        return
    save_resolved_recipe(recipe, tmp)
    (tmp / "train_state.json").write_text(json.dumps(asdict(train_state), indent=1, default=str))
    digests = {name: d for part in gathered for name, d in (part or {}).items()}
    digests.update(digest_files(tmp, [n for n in files_to_hash(tmp) if n not in digests]))
    write_manifest(tmp, digests)
    (tmp / COMPLETE).write_text(str(train_state.iteration))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_tracker(root, train_state.iteration)
    _prune(root, keep_last, train_state.iteration)


def _write_tracker(root: Path, iteration: int) -> None:
    tmp = root / (TRACKER + ".tmp")
    tmp.write_text(str(iteration))
    os.replace(tmp, root / TRACKER)


def _prune(root: Path, keep_last: int, committed: int) -> None:
    """Drop old checkpoints beyond keep_last and temp directories that killed saves left behind.

    Only temp directories of steps up to ``committed`` go: a later one may be an asynchronous save
    still being written.
    """
    for stale in root.glob("iter_*.tmp"):
        if int(stale.name[len("iter_") : -len(".tmp")]) <= committed:
            shutil.rmtree(stale, ignore_errors=True)
    if keep_last <= 0:
        return
    # Only complete checkpoints count and go: a directory without its marker is not ours to judge.
    for step in scan(root).complete[:-keep_last]:
        shutil.rmtree(iter_dir(root, step), ignore_errors=True)


def verify_checkpoint(path: Path) -> None:
    """Collective: each rank checks its share of the files against ``checksums.json``."""
    try:
        manifest = read_manifest(path)
    except ManifestError as err:
        raise damaged_checkpoint_error(path, MANIFEST, str(err)) from err
    if manifest is None:
        if dist.get_rank() == 0:
            print(f"note: {path} has no checksums.json (saved before checksums); loading it unverified", flush=True)
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    names = sorted(manifest)[rank::world]
    gathered: list[list | None] = [None] * world
    dist.all_gather_object(gathered, check_files(path, {n: manifest[n] for n in names}))
    problems = sorted(p for part in gathered for p in part or [])
    if problems:
        name, why = problems[0]
        more = f" (and {len(problems) - 1} more files)" if len(problems) > 1 else ""
        raise damaged_checkpoint_error(path, name, why + more)


_OPTIMIZER_TENSORS = "optimizer_tensors_of_this_layout"


def load_checkpoint(
    path: Path,
    model: list,
    optimizer: Any,
    scheduler: Any,
    *,
    load_optimizer: bool,
    load_counters: bool,
    allow_missing: list[str],
) -> TrainState | None:
    """Load into the live model (any layout: dist_checkpointing reshards).

    ``load_optimizer``: also the optimizer moments; ``load_counters``: the step, consumed
    samples/tokens, LR-schedule and stage state.  Returns the saved ``TrainState`` when counters
    were loaded, else ``None`` (weights only: an import from Hugging Face, or a new stage).
    """
    verify_checkpoint(path)
    has_state = (path / "train_state.json").is_file()
    load_optimizer = load_optimizer and has_state
    load_counters = load_counters and has_state
    state = model_sharded_state_dict(model)
    try:
        saved_keys = _saved_keys(path)
    except (Exception, CheckpointException) as err:  # DCP's exception is a BaseException
        raise damaged_checkpoint_error(path, ".metadata", f"unreadable: {type(err).__name__}: {err}") from err
    # This run's optimizer tensors, by model-space key, under a key of their own: the checkpoint's
    # own non-tensor optimizer state comes back under "optimizer" (see training/optimizer_state.py).
    optimizer_load = OptimizerLoad(optimizer, state, saved_keys) if load_optimizer else None
    if optimizer_load is not None:
        state[_OPTIMIZER_TENSORS] = optimizer_load.tensors
    if load_counters:
        state["scheduler"] = scheduler.state_dict()
    rng = _rng_sharded_object()
    if rng.key in saved_keys:  # absent when the layout changed or for weights-only imports
        state["rng_state"] = rng
    allow_missing = [*allow_missing, *_FRESH_OK]
    _drop_missing(state, saved_keys, allow_missing)
    try:
        loaded = dist_checkpointing.load(state, str(path), strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    except (Exception, CheckpointException) as err:  # DCP's exception is a BaseException
        raise damaged_checkpoint_error(path, None, f"loading failed: {type(err).__name__}: {err}") from err
    for i, chunk in enumerate(model):
        _load_model_chunk(unwrap(chunk), loaded["model" if len(model) == 1 else f"model{i}"], allow_missing, path)
    if "rng_state" in loaded:
        _set_rng_state(loaded["rng_state"])
    if optimizer_load is not None:
        optimizer_load.finish(loaded.get(_OPTIMIZER_TENSORS, {}), loaded.get("optimizer"))
    else:
        # BF16/FP16 optimizers keep FP32 main copies of the weights, made when they were built (from
        # the fresh initialisation): without this refresh the first step writes that init back.
        optimizer.reload_model_params()
    if not load_counters:
        return None
    scheduler.load_state_dict(loaded["scheduler"])
    return TrainState(**json.loads((path / "train_state.json").read_text()))


def _load_model_chunk(module: torch.nn.Module, state: dict, allow_missing: list[str], path: Path) -> None:
    """Strict load, except for names matching ``allow_missing`` (their fresh values are kept)."""
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not any(a in k for a in allow_missing)]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"{path}: checkpoint does not match the model: missing {missing[:8]}, "
            f"unexpected {list(result.unexpected_keys)[:8]} (is the recipe's model the one that was saved?)"
        )


def _saved_keys(path: Path) -> set[str]:
    """Keys of every tensor and object stored in the checkpoint."""
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy

    strategy = get_default_load_sharded_strategy(str(path))
    return set(strategy.load_sharded_metadata(str(path)).keys())


def _drop_missing(state: dict, saved: set[str], allow: list[str]) -> None:
    """Remove model tensors the checkpoint lacks when their names match ``allow`` (e.g. 'mtp')."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    for top in [k for k in state if k.startswith("model")]:
        sub = state[top]
        for name in list(sub):
            item = sub[name]
            if isinstance(item, ShardedBase) and item.key not in saved and any(a in item.key for a in allow):
                del sub[name]
