"""Record readers for JSONL (plain, .gz, .zst) and Parquet, with per-record validation.

Every reader yields ``(line, value)`` with a 1-based line (Parquet: row) number so that any later
failure can still name ``file:line``; bad records go through an :class:`ErrorPolicy`.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from data_prep.errors import BadRecord, ErrorPolicy

PARQUET_SUFFIXES = (".parquet", ".pq")
_PARQUET_BATCH_ROWS = 4096


def is_parquet(path: str | Path) -> bool:
    return str(path).endswith(PARQUET_SUFFIXES)


class _ZstdFrames(io.RawIOBase):
    """Every frame of a ``.zst`` file, raising ``EOFError`` where the input ends inside a frame.

    zstandard's ``stream_reader`` just stops at a cut-off frame, so a file truncated inside its
    first frame read as empty and a later cut read as one broken JSON line; gzip already raises.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self._raw = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._inside = False  # input fed since the last complete frame
        self._out, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._pos == len(self._out):
            data = self._raw.read(1 << 20)
            if not data:
                if self._inside:
                    raise EOFError("the zstd stream ends inside a frame (truncated file)")
                return 0
            self._out, self._pos = self._decompress(data), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n

    def _decompress(self, data: bytes) -> bytes:
        parts = []
        while data:
            parts.append(self._frame.decompress(data))
            self._inside = True
            if not self._frame.eof:
                break
            data = self._frame.unused_data
            self._frame = zstandard.ZstdDecompressor().decompressobj()
            self._inside = False
        return b"".join(parts)

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open_binary(path: str) -> IO[bytes]:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith((".zst", ".zstd")):
        return io.BufferedReader(_ZstdFrames(path))
    return open(path, "rb")  # noqa: SIM115 - caller closes


def _iter_json_lines(path: str, policy: ErrorPolicy) -> Iterator[tuple[int, dict[str, Any]]]:
    """Parsed JSON objects of a JSONL file; blank lines are not records."""
    line_no = 0
    try:
        with _open_binary(path) as stream:
            for line_no, raw in enumerate(stream, start=1):
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    policy.handle(BadRecord(path, line_no, "invalid_utf8", f"byte {exc.start}: {exc.reason}"))
                    continue
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as exc:
                    policy.handle(
                        BadRecord(path, line_no, "invalid_json", exc.msg + f" (column {exc.colno})")
                    )
                    continue
                if not isinstance(value, dict):
                    policy.handle(
                        BadRecord(
                            path, line_no, "invalid_json", f"expected an object, got {type(value).__name__}"
                        )
                    )
                    continue
                yield line_no, value
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
        policy.handle(BadRecord(path, line_no + 1, "corrupt_file", f"{type(exc).__name__}: {exc}"))


def _iter_parquet_batches(
    path: str, columns: list[str] | None, policy: ErrorPolicy
) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Record batches with the 1-based row number of their first row; a corrupt file stops here."""
    row = 1
    try:
        parquet = pq.ParquetFile(path)
        if columns is not None:
            missing = [c for c in columns if c not in parquet.schema_arrow.names]
            if missing:
                policy.handle(
                    BadRecord(
                        path, 1, "missing_key", f"no column {missing[0]!r} in {parquet.schema_arrow.names}"
                    ),
                    count=parquet.metadata.num_rows,
                )
                return
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
            yield row, batch
            row += batch.num_rows
    except (OSError, pa.ArrowException) as exc:
        policy.handle(BadRecord(path, row, "corrupt_file", f"{type(exc).__name__}: {exc}"))


def check_text(value: Any, path: str, line: int, key: str, max_bytes: int) -> tuple[str, int]:
    """A document's text and UTF-8 byte size, or BadRecord naming why it cannot be tokenized."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRecord(path, line, "invalid_utf8", f"{key!r} byte {exc.start}: {exc.reason}") from None
    if not isinstance(value, str):
        raise BadRecord(path, line, "not_string", f"{key!r} is {type(value).__name__}, expected a string")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:  # lone surrogates from "\ud800"-style JSON escapes
        raise BadRecord(path, line, "invalid_utf8", f"{key!r} char {exc.start}: {exc.reason}") from None
    if not value.strip():
        raise BadRecord(path, line, "empty", f"{key!r} has no non-whitespace text")
    if size > max_bytes:
        raise BadRecord(path, line, "too_long", f"{key!r} is {size} bytes, over --max-doc-bytes {max_bytes}")
    return value, size


def iter_texts(path: str, key: str, max_bytes: int, policy: ErrorPolicy) -> Iterator[tuple[int, str, int]]:
    """``(line, text, utf8_bytes)`` for every valid document of a JSONL or Parquet file."""
    if is_parquet(path):
        for first_row, batch in _iter_parquet_batches(path, [key], policy):
            column = batch.column(0)
            if not (
                pa.types.is_string(column.type)
                or pa.types.is_large_string(column.type)
                or pa.types.is_binary(column.type)
                or pa.types.is_large_binary(column.type)
            ):
                policy.handle(
                    BadRecord(path, first_row, "not_string", f"column {key!r} has type {column.type}"),
                    count=batch.num_rows,
                )
                continue
            for offset, value in enumerate(column.to_pylist()):
                line = first_row + offset
                try:
                    if value is None:
                        raise BadRecord(path, line, "missing_key", f"{key!r} is null")
                    text, size = check_text(value, path, line, key, max_bytes)
                except BadRecord as err:
                    policy.handle(err)
                    continue
                yield line, text, size
        return
    for line, record in _iter_json_lines(path, policy):
        try:
            if key not in record:
                raise BadRecord(path, line, "missing_key", f"no key {key!r} (keys: {sorted(record)[:8]})")
            text, size = check_text(record[key], path, line, key, max_bytes)
        except BadRecord as err:
            policy.handle(err)
            continue
        yield line, text, size


def iter_records(path: str, policy: ErrorPolicy) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line, record)`` for every JSON object (JSONL) or row (Parquet) of a structured file."""
    if is_parquet(path):
        for first_row, batch in _iter_parquet_batches(path, None, policy):
            for offset, row in enumerate(batch.to_pylist()):
                yield first_row + offset, row
        return
    yield from _iter_json_lines(path, policy)
