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
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_parquet_atomic(path: str | Path, table: pa.Table, metadata: dict[str, Any]) -> None:
    """Write ``table`` with ``metadata`` (JSON, under schema key ``joyai_data_prep``)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    table = table.replace_schema_metadata({FORMAT_KEY: json.dumps(metadata).encode()})
    tmp = Path(f"{path}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def read_parquet(path: str | Path, expected_format: str) -> tuple[pa.Table, dict[str, Any]]:
    """A table written by :func:`write_parquet_atomic` and its metadata; checks the format tag."""
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
