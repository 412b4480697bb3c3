"""Atomic writes: every output appears under its final name only when complete."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_KEY = b"joyai_data_prep"


def write_json_atomic(path: str | Path, payload: dict[str, Any]) -> None:
    tmp = Path(f"{path}.tmp")
    write_json(tmp, payload)
    os.replace(tmp, path)


class OutputSet:
    """A run's output files, written under temporary names and renamed together at the very end.

    A run that fails (bad data, full disk, Ctrl-C) publishes none of its files, so the directory
    never holds a new data file beside an old stats file; the earlier run's set stays as it was
    (the CLI says so).
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []

    def stage(self, final: str | Path, tmp: str | Path | None = None) -> Path:
        """The temporary path to write ``final``'s contents to."""
        final = Path(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tmp) if tmp is not None else Path(f"{final}.partial")
        self._pending.append((staged, final))
        return staged

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: Any) -> None:
        if kind is None:
            for staged, final in self._pending:
                os.replace(staged, final)
            return
        for staged, _ in self._pending:
            staged.unlink(missing_ok=True)


def write_parquet(path: str | Path, table: pa.Table, metadata: dict[str, Any]) -> None:
    """Write ``table`` with ``metadata`` (JSON, under schema key ``joyai_data_prep``)."""
    table = table.replace_schema_metadata({FORMAT_KEY: json.dumps(metadata).encode()})
    pq.write_table(table, path, compression="zstd")


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def read_parquet(path: str | Path, expected_format: str) -> tuple[pa.Table, dict[str, Any]]:
    """A table written by :func:`write_parquet` and its metadata; checks the format tag."""
    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(FORMAT_KEY)
    metadata = json.loads(raw) if raw else {}
    if metadata.get("format") != expected_format:
        raise ValueError(f"{path}: not a {expected_format} file (format {metadata.get('format')!r})")
    return table, metadata


def list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(values, offsets)`` NumPy views of a list column: row i is ``values[offsets[i]:offsets[i+1]]``."""
    column = table.column(name).combine_chunks()
    return column.values.to_numpy(zero_copy_only=False), column.offsets.to_numpy()
