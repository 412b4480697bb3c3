"""Megatron ``torch_dist`` checkpoints without Megatron: stream-read regions, stream-write chunks.

A ``torch_dist`` checkpoint is a PyTorch Distributed Checkpoint (DCP) directory whose tensor keys
are Megatron's *global* ShardedTensor keys: every rank stored its slice as a chunk with offsets in
the global tensor, so the keys and global shapes do not depend on TP/PP/EP/expert-TP or on grouped
vs sequential experts.  Megatron adds ``metadata.json`` (the backend marker) and stores objects
(``_extra_state``, the common state) as pickled byte entries named ``<key>/shard_<offset>_<shape>``.

Two storage facts differ from parameter names (see :func:`ckpt_location`): routed experts of one
layer are stacked along a leading expert axis under ``mlp.experts.experts.linear_fc{1,2}.weight``,
and the MTP layer is stored as ``mtp.layers.M.transformer_layer.*``.

Reading never builds the model: :class:`DistCkptReader` answers any rectangular region of a stored
tensor from the chunks that overlap it.  Writing goes through DCP's own ``FileSystemWriter`` with a
planner that produces each chunk only when the writer thread asks for it
(:func:`write_dist_checkpoint`), so peak memory is a few tensors, not the model.
"""

from __future__ import annotations

import bisect
import io
import json
import math
import os
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

from joyai_megatron.convert.common import ConversionError, fmt_shape
from joyai_megatron.training.checkpoint_scan import TRACKER as TRACKER_FILE
from joyai_megatron.training.checkpoint_scan import require_complete, resolve_checkpoint

MEGATRON_BACKEND_MARKER = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
MODEL_KEY_PREFIXES = ("embedding.", "decoder.", "mtp.", "output_layer.")

_EXPERT_PARAM = re.compile(r"^(.*\.mlp\.experts)\.local_experts\.(\d+)\.(linear_fc[12]\.weight)$")
_EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.experts\.(linear_fc[12]\.weight)$")


def ckpt_location(param: str) -> tuple[str, int | None]:
    """(storage key, expert index or None) of a canonical parameter name."""
    m = _EXPERT_PARAM.match(param)
    if m:
        return f"{m.group(1)}.experts.{m.group(3)}", int(m.group(2))
    if param.startswith("mtp.layers."):
        param = param.replace(".mtp_model_layer.", ".transformer_layer.", 1)
    return param, None


def param_name(key: str, expert: int | None) -> str:
    """Inverse of :func:`ckpt_location`."""
    if expert is not None:
        m = _EXPERT_KEY.match(key)
        if not m:
            raise ConversionError(f"{key} is not a stacked expert tensor")
        return f"{m.group(1)}.local_experts.{expert}.{m.group(2)}"
    if key.startswith("mtp.layers."):
        key = key.replace(".transformer_layer.", ".mtp_model_layer.", 1)
    return key


def is_stacked_expert_key(key: str) -> bool:
    return _EXPERT_KEY.match(key) is not None


def extra_state_key(param: str, num_experts: int) -> str | None:
    """The ``_extra_state`` object Megatron's local backend saves beside a linear layer's weight."""
    module, _, leaf = param.rpartition(".")
    if leaf != "weight" or not (
        module.rpartition(".")[2].startswith("linear_") or module.endswith("eh_proj")
    ):
        return None
    key, expert = ckpt_location(param)
    obj = key.rpartition(".")[0] + "._extra_state"
    if expert is None:
        return f"{obj}/shard_0_1"
    return f"{obj}/shard_{expert}_{num_experts}"


def resolve_iteration_dir(path: str | os.PathLike) -> Path:
    """``<ckpt_dir>`` (its newest complete ``iter_*``) or one complete iteration directory.

    Never an ``iter_*.tmp`` or a directory without its ``COMPLETE`` marker: exporting a save that
    was still running (or was killed) would publish a partial model.
    """
    path = Path(path)
    if (path / "metadata.json").is_file():
        require_complete(path)
    else:
        path = resolve_checkpoint(path)
    if not (path / "metadata.json").is_file():
        raise ConversionError(
            f"{path} is not a torch_dist checkpoint (no metadata.json); pass <ckpt_dir> with "
            f"{TRACKER_FILE} or an iter_* directory"
        )
    marker = json.loads((path / "metadata.json").read_text())
    if marker.get("sharded_backend") != "torch_dist":
        raise ConversionError(
            f"{path}: sharded_backend={marker.get('sharded_backend')!r}, expected 'torch_dist'"
        )
    return path


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


class _FileSlice(io.RawIOBase):
    """A seekable read-only window [offset, offset+length) of an open file, for ``torch.load``.

    Loading straight from the file (instead of reading the bytes first) keeps one copy of a chunk
    in memory, not two: the embedding's 0.5 GB chunk would otherwise transiently cost 1 GB more.
    """

    def __init__(self, f: io.BufferedReader, offset: int, length: int) -> None:
        self.f, self.start, self.length, self.pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, min(self.length, base + pos))
        return self.pos

    def readinto(self, buf) -> int:  # type: ignore[no-untyped-def]
        n = min(len(buf), self.length - self.pos)
        if n <= 0:
            return 0
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(buf)[:n])
        self.pos += got
        return got


class DistCkptReader:
    """Random access to the tensors of one ``torch_dist`` iteration directory (thread-safe)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = resolve_iteration_dir(path)
        self.metadata: Metadata = FileSystemReader(self.path).read_metadata()
        self.tensors: dict[str, TensorInfo] = {
            k: TensorInfo(tuple(v.size), v.properties.dtype)
            for k, v in self.metadata.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)
        }
        self._local = threading.local()
        self._index: dict[str, tuple[list[int], list[ChunkStorageMetadata]]] = {}
        self._index_lock = threading.Lock()

    def model_keys(self) -> list[str]:
        return [k for k in self.tensors if k.startswith(MODEL_KEY_PREFIXES)]

    def _file(self, relative: str) -> io.BufferedReader:
        files = self._local.__dict__.setdefault("files", {})
        if relative not in files:
            files[relative] = open(self.path / relative, "rb")  # noqa: SIM115 - cached per thread
        return files[relative]

    def _chunks_along_dim0(self, key: str, lo: int, hi: int) -> list[ChunkStorageMetadata]:
        """Stored chunks whose dim-0 range meets [lo, hi): bisect, not a scan of every chunk.

        A layer's stacked experts have ~2 chunks per expert and the export asks for each
        expert's gate, up and down separately; scanning all chunks per request is quadratic.
        """
        with self._index_lock:
            if key not in self._index:
                chunks = sorted(self.metadata.state_dict_metadata[key].chunks, key=lambda c: c.offsets[0])
                self._index[key] = ([c.offsets[0] for c in chunks], chunks)
        starts, chunks = self._index[key]
        first = max(0, bisect.bisect_right(starts, lo) - 1)
        while first > 0 and chunks[first - 1].offsets[0] + chunks[first - 1].sizes[0] > lo:
            first -= 1  # uneven chunking: an earlier, longer chunk may still reach lo
        return [c for c in chunks[first : bisect.bisect_left(starts, hi)] if c.offsets[0] + c.sizes[0] > lo]

    def _load_chunk(self, key: str, chunk: ChunkStorageMetadata) -> torch.Tensor:
        info = self.metadata.storage_data[MetadataIndex(key, chunk.offsets)]
        if getattr(info, "transform_descriptors", None):
            raise ConversionError(
                f"{key}: stored with transforms {info.transform_descriptors}; not supported"
            )
        view = _FileSlice(self._file(info.relative_path), info.offset, info.length)
        return torch.load(view, map_location="cpu", weights_only=True)

    def read(
        self, key: str, offsets: Iterable[int] | None = None, sizes: Iterable[int] | None = None
    ) -> torch.Tensor:
        """The region [offsets, offsets+sizes) of global tensor ``key`` (whole tensor by default)."""
        if key not in self.tensors:
            raise ConversionError(f"{self.path}: no tensor {key!r}")
        shape = self.tensors[key].shape
        offsets = tuple(offsets) if offsets is not None else (0,) * len(shape)
        sizes = tuple(sizes) if sizes is not None else shape
        if not shape:  # 0-d tensors are stored whole
            return self._load_chunk(key, self.metadata.state_dict_metadata[key].chunks[0])
        candidates = self._chunks_along_dim0(key, offsets[0], offsets[0] + sizes[0])
        if (
            len(candidates) == 1
            and tuple(candidates[0].offsets) == offsets
            and tuple(candidates[0].sizes) == sizes
        ):
            return self._load_chunk(key, candidates[0])  # the common case: one stored chunk is the region
        out = torch.empty(sizes, dtype=self.tensors[key].dtype)
        covered = 0
        for chunk in candidates:
            lo = [max(o, c) for o, c in zip(offsets, chunk.offsets, strict=True)]
            hi = [
                min(o + s, c + cs)
                for o, s, c, cs in zip(offsets, sizes, chunk.offsets, chunk.sizes, strict=True)
            ]
            if any(a >= b for a, b in zip(lo, hi, strict=True)):
                continue
            data = self._load_chunk(key, chunk)
            src = tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, chunk.offsets, strict=True))
            dst = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offsets, strict=True))
            out[dst] = data[src]
            covered += math.prod(b - a for a, b in zip(lo, hi, strict=True))
        if covered != out.numel():
            raise ConversionError(
                f"{key}: stored chunks cover {covered} of {out.numel()} elements of region "
                f"offsets={list(offsets)} sizes={fmt_shape(sizes)} (incomplete checkpoint?)"
            )
        return out


@dataclass(frozen=True)
class ChunkToWrite:
    """One stored chunk of a global tensor, produced by ``load`` when the writer needs it."""

    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    global_shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]


class _LazySavePlanner(SavePlanner):
    """A DCP save planner whose items are given up front and whose data is made on demand."""

    def __init__(
        self,
        chunks: list[ChunkToWrite],
        objects: dict[str, object],
        on_write: Callable[[int], None] | None,
    ) -> None:
        self.chunks = {(c.key, c.offsets): c for c in chunks}
        if len(self.chunks) != len(chunks):
            raise ConversionError("two chunks planned for the same tensor region")
        self.objects = objects
        self.on_write = on_write
        self.stop = threading.Event()

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = False) -> None:  # type: ignore[override]
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        items = [
            WriteItem(
                index=MetadataIndex(c.key, torch.Size(c.offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)),
                    properties=TensorProperties(dtype=c.dtype),
                    size=torch.Size(c.global_shape),
                ),
            )
            for c in self.chunks.values()
        ]
        items += [WriteItem(index=MetadataIndex(k), type=WriteItemType.BYTE_IO) for k in self.objects]
        return SavePlan(items)

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        return create_default_global_save_plan(all_plans)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        if self.stop.is_set():  # the save was interrupted: DCP's other writer threads end here
            raise ConversionError(f"stopped before {write_item.index.fqn}")
        if write_item.type == WriteItemType.BYTE_IO:
            buf = io.BytesIO()
            torch.save([self.objects[write_item.index.fqn]], buf)
            return buf
        chunk = self.chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
        tensor = chunk.load()
        if tuple(tensor.shape) != chunk.sizes or tensor.dtype != chunk.dtype:
            raise ConversionError(
                f"{chunk.key}: produced {fmt_shape(tensor.shape)} {tensor.dtype}, planned "
                f"{fmt_shape(chunk.sizes)} {chunk.dtype} at offsets {list(chunk.offsets)}"
            )
        # torch.save writes a view's whole storage: hand DCP a tensor that owns exactly its data.
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        if self.on_write is not None:
            self.on_write(tensor.numel() * tensor.element_size())
        return tensor.contiguous()


def write_dist_checkpoint(
    path: str | os.PathLike,
    chunks: list[ChunkToWrite],
    objects: dict[str, object],
    *,
    threads: int = 4,
    on_write: Callable[[int], None] | None = None,
    file_per_chunk: bool = False,
) -> None:
    """Write a ``torch_dist`` iteration directory that Megatron's ``dist_checkpointing.load`` reads.

    ``objects`` maps unique keys (``<key>/shard_<offset>_<shape>``) to picklable values; Megatron
    stores the common (non-sharded) state as ``common_state/shard_0_1``.  DCP's writer keeps every
    tensor of a file referenced until the file is complete (torch 2.14 ``_write_files_from_queue``),
    so with ``threads`` files (the default) every chunk the loaders made stays in memory; loaders
    that return file-backed tensors (``from-hf``'s mmapped safetensors) do not mind, loaders that
    compute their chunks (``merge``) pass ``file_per_chunk`` to hold one chunk per writer thread.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    objects = {"common_state/shard_0_1": {}, **objects}
    writer = FileSystemWriter(path, single_file_per_rank=not file_per_chunk, thread_count=max(1, threads))
    planner = _LazySavePlanner(chunks, objects, on_write)
    try:
        dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
    except BaseException:
        planner.stop.set()
        raise
    (path / "metadata.json").write_text(json.dumps(MEGATRON_BACKEND_MARKER))
