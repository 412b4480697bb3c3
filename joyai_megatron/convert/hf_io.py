"""Hugging Face safetensors checkpoints: lazy per-tensor reading and streaming shard writing.

The writer knows every tensor's name, shape and dtype before it starts (the export plans them from
checkpoint metadata), so it writes each shard's safetensors header first and then streams tensors
into the file one at a time: a shard never has to sit in memory, which
``safetensors.torch.save_file`` would require.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from joyai_megatron.convert.common import (
    SAFETENSORS_DTYPES,
    TORCH_TO_SAFETENSORS,
    ConversionError,
    dtype_size,
    fmt_shape,
)

INDEX_FILE = "model.safetensors.index.json"


class HFCheckpoint:
    """The tensors of an HF model directory (sharded with an index, or one ``model.safetensors``)."""

    def __init__(self, hf_dir: str | os.PathLike) -> None:
        self.dir = Path(hf_dir)
        index = self.dir / INDEX_FILE
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.dir / "model.safetensors").is_file():
            with safe_open(self.dir / "model.safetensors", framework="pt") as f:
                self.weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise ConversionError(f"{hf_dir}: neither {INDEX_FILE} nor model.safetensors found")
        self._handles: dict[str, object] = {}
        self._lock = threading.Lock()
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for file in sorted(set(self.weight_map.values())):
            for name, (shape, dtype) in _read_header(self.dir / file).items():
                if self.weight_map.get(name) == file:
                    self._meta[name] = (shape, dtype)
        missing = sorted(set(self.weight_map) - set(self._meta))
        if missing:
            raise ConversionError(f"{hf_dir}: index lists {missing[0]} but its file does not hold it")

    def names(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def get(self, name: str) -> torch.Tensor:
        file = self.weight_map[name]
        with self._lock:
            if file not in self._handles:
                self._handles[file] = safe_open(self.dir / file, framework="pt")
            handle = self._handles[file]
        return handle.get_tensor(name)  # type: ignore[attr-defined]


def _read_header(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The shard's tensor table; a cut-off file (shorter than its tensors' end) is named here."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        end = 8 + n + max((info["data_offsets"][1] for k, info in header.items() if k != "__metadata__"), default=0)
    except (OSError, struct.error, ValueError, KeyError, TypeError) as err:
        raise ConversionError("unreadable safetensors file", str(path), str(err), "restore the file") from err
    size = path.stat().st_size
    if size < end:
        raise ConversionError(
            "truncated safetensors file", str(path), f"{size} bytes, its tensors end at byte {end}", "restore the file"
        )
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ConversionError(f"{path.name}: {name} has unsupported dtype {info['dtype']}")
        out[name] = (tuple(info["shape"]), SAFETENSORS_DTYPES[info["dtype"]])
    return out


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = dtype_size(self.dtype)
        for s in self.shape:
            n *= s
        return n


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Consecutive tensors grouped into shards of at most ``max_shard_bytes`` (one tensor may exceed it)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return [s for s in shards if s]


def _write_shard(
    path: Path, tensors: list[PlannedTensor], on_write: Callable[[int], None] | None, stop: threading.Event
) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": TORCH_TO_SAFETENSORS[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            if stop.is_set():  # another shard failed or the run was interrupted: stop promptly
                raise ConversionError(f"{path.name}: stopped before {t.name}")
            data = t.make()
            if tuple(data.shape) != t.shape or data.dtype != t.dtype:
                raise ConversionError(
                    f"{t.name}: produced {fmt_shape(data.shape)} {data.dtype}, planned {fmt_shape(t.shape)} {t.dtype}"
                )
            flat = data.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # a GPU-built model too
            f.write(memoryview(flat.numpy()))
            if on_write is not None:
                on_write(t.nbytes)
        f.flush()
        os.fsync(f.fileno())


def write_hf_shards(
    out_dir: Path,
    tensors: list[PlannedTensor],
    *,
    max_shard_bytes: int,
    threads: int = 4,
    on_write: Callable[[int], None] | None = None,
) -> dict[str, str]:
    """Write ``model-0000i-of-0000N.safetensors`` (in parallel threads) and the index; returns weight_map."""
    shards = plan_shards(tensors, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="shard-writer")
    futures = [
        pool.submit(_write_shard, out_dir / n, s, on_write, stop) for n, s in zip(names, shards, strict=True)
    ]
    try:
        for fut in futures:
            fut.result()
    except BaseException:
        # Ctrl-C / SIGTERM / a failed shard: writers stop after their current tensor, so the
        # caller can remove the partial output without a thread still writing into it.
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    weight_map = {t.name: n for n, s in zip(names, shards, strict=True) for t in s}
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map
