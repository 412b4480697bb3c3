"""Bad-input handling shared by every subcommand.

A bad record either stops the job with ``file:line: reason: detail`` (``--on-error fail``) or is
counted by reason and dropped (``--on-error skip``), so a 20T-token run is not lost to one broken
line and the stats still say what was dropped and why.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

OnError = Literal["fail", "skip"]

# Every reason a record can be rejected for; stats JSON keys use these names.
REASONS = (
    "invalid_json",
    "missing_key",
    "not_string",
    "invalid_utf8",
    "empty",
    "too_long",
    "corrupt_file",
    "bad_messages",
    "unknown_role",
    "unbalanced_think",
    "no_assistant",
)


class DataPrepError(Exception):
    """A user-facing problem (bad input, missing file, mismatching engine): print it, exit 1."""


class BadRecord(DataPrepError):
    """One rejected input record, located by file and 1-based line (Parquet: row)."""

    def __init__(self, path: str, line: int, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown bad-record reason {reason!r}")
        super().__init__(f"{path}:{line}: {reason}: {detail}")
        self.path, self.line, self.reason, self.detail = path, line, reason, detail

    def __reduce__(self) -> tuple[type, tuple[str, int, str, str]]:
        # Rebuilt from its fields when a worker process sends it back.
        return BadRecord, (self.path, self.line, self.reason, self.detail)


class ErrorPolicy:
    """Raise (fail) or count (skip) bad records; ``skipped`` maps reason -> count."""

    def __init__(self, mode: OnError = "fail") -> None:
        if mode not in ("fail", "skip"):
            raise ValueError(f"--on-error must be 'fail' or 'skip', got {mode!r}")
        self.mode = mode
        self.skipped: Counter[str] = Counter()

    def handle(self, error: BadRecord, count: int = 1) -> None:
        """Raise ``error`` under fail; otherwise count it ``count`` times (a corrupt file's rows)."""
        if self.mode == "fail":
            raise error
        self.skipped[error.reason] += count
