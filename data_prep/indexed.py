"""Megatron-Core IndexedDataset files (``.bin`` + ``.idx``) written with NumPy.

The bytes are identical to ``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder``
(tests/data_prep/test_indexed.py proves it), but this path needs neither ``torch`` (an 8 s import)
nor a Python loop per document, and it writes under temporary names so that a crash never leaves a
``.bin`` without its ``.idx``.

``.idx`` layout (little-endian): ``MMIDIDX\\x00\\x00``, u64 version 1, u8 dtype code, u64 sequence
count S, u64 document count D, i32[S] lengths, i64[S] byte pointers, i64[D] document indices.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
# Megatron-Core's DType codes; only the token dtypes matter here.
DTYPE_CODES: dict[type[np.number], int] = {
    np.uint8: 1,
    np.int8: 2,
    np.int16: 3,
    np.int32: 4,
    np.int64: 5,
    np.float64: 6,
    np.float32: 7,
    np.uint16: 8,
}
_CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def optimal_dtype(vocab_size: int) -> type[np.number]:
    """Megatron-Core's ``DType.optimal_dtype``: uint16 below 65,500 ids, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def tmp_path(path: str | Path) -> Path:
    return Path(f"{path}.tmp")


def write_index(
    idx_path: str | Path,
    dtype: type[np.number],
    sequence_lengths: np.ndarray,
    document_indices: np.ndarray,
) -> None:
    """Write an ``.idx`` file (non-multimodal) exactly as Megatron-Core's ``_IndexWriter`` does."""
    lengths = np.ascontiguousarray(sequence_lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    documents = np.ascontiguousarray(document_indices, dtype=np.int64)
    with open(idx_path, "wb") as out:
        out.write(INDEX_HEADER)
        out.write(struct.pack("<Q", 1))
        out.write(struct.pack("<B", DTYPE_CODES[dtype]))
        out.write(struct.pack("<Q", len(lengths)))
        out.write(struct.pack("<Q", len(documents)))
        out.write(lengths.tobytes())
        out.write(pointers.tobytes())
        out.write(documents.tobytes())


def read_index(idx_path: str | Path) -> tuple[type[np.number], np.ndarray, np.ndarray]:
    """``(dtype, sequence_lengths, document_indices)`` of an ``.idx`` file."""
    with open(idx_path, "rb") as f:
        header = f.read(len(INDEX_HEADER))
        if header != INDEX_HEADER:
            raise ValueError(f"{idx_path}: not a Megatron IndexedDataset index (header {header!r})")
        (version,) = struct.unpack("<Q", f.read(8))
        if version != 1:
            raise ValueError(f"{idx_path}: unsupported index version {version}")
        (code,) = struct.unpack("<B", f.read(1))
        (sequences,) = struct.unpack("<Q", f.read(8))
        (documents,) = struct.unpack("<Q", f.read(8))
        lengths = np.fromfile(f, dtype=np.int32, count=sequences)
        np.fromfile(f, dtype=np.int64, count=sequences)  # pointers: recomputed on write
        document_indices = np.fromfile(f, dtype=np.int64, count=documents)
    return _CODE_DTYPES[code], lengths, document_indices


def publish(prefix: str | Path) -> None:
    """Rename ``PREFIX.{idx,bin}.tmp`` into place, ``.idx`` first: a ``.bin`` never stands alone."""
    for suffix in (".idx", ".bin"):
        os.replace(tmp_path(f"{prefix}{suffix}"), f"{prefix}{suffix}")


class DocumentWriter:
    """Streams documents (one sequence each) into ``PREFIX.bin.tmp`` and ``PREFIX.idx.tmp``."""

    def __init__(self, prefix: str | Path, dtype: type[np.number]) -> None:
        self.prefix, self.dtype = str(prefix), dtype
        self._bin = open(tmp_path(self.prefix + ".bin"), "wb")  # noqa: SIM115 - closed in finish()
        self._lengths: list[np.ndarray] = []

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as concatenated ``tokens`` and per-document ``lengths``."""
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._lengths.append(np.asarray(lengths, dtype=np.int32))

    def finish(self) -> None:
        """Close the data file and write the index; both stay under their temporary names."""
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int32)
        write_index(
            tmp_path(self.prefix + ".idx"), self.dtype, lengths, np.arange(len(lengths) + 1, dtype=np.int64)
        )

    def abort(self) -> None:
        self._bin.close()


def merge(prefixes: list[str], output_prefix: str) -> None:
    """Concatenate IndexedDatasets like ``IndexedDatasetBuilder.add_index``, then publish."""
    if not prefixes:
        raise ValueError("nothing to merge")
    dtype = None
    lengths, documents, offset = [], [np.zeros(1, dtype=np.int64)], 0
    with open(tmp_path(output_prefix + ".bin"), "wb") as out:
        for prefix in prefixes:
            shard_dtype, shard_lengths, shard_documents = read_index(prefix + ".idx")
            if dtype is not None and shard_dtype != dtype:
                raise ValueError(f"{prefix}.idx: dtype {shard_dtype.__name__} differs from {dtype.__name__}")
            dtype = shard_dtype
            lengths.append(shard_lengths)
            documents.append(shard_documents[1:] + offset)
            offset += len(shard_lengths)
            with open(prefix + ".bin", "rb") as src:
                shutil.copyfileobj(src, out, length=16 << 20)
    write_index(tmp_path(output_prefix + ".idx"), dtype, np.concatenate(lengths), np.concatenate(documents))
    publish(output_prefix)
