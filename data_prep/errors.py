"""Bad-input handling shared by every subcommand.

A bad record either stops the job with ``file:line: reason: detail`` (``--on-error fail``) or is
counted by reason and dropped (``--on-error skip``), so a 20T-token run is not lost to one broken
line and the stats still say what was dropped and why.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

from joyai_megatron.errors import UserError

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


class DataPrepError(UserError):
    """A user-facing problem (bad input, missing file, mismatching engine): print it, exit 1."""


class BadRecord(DataPrepError):
    """One rejected input record, located by file and 1-based line (Parquet: row)."""

    def __init__(self, path: str, line: int, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown bad-record reason {reason!r}")
        super().__init__(reason, f"{path}:{line}", detail, "--on-error skip counts and drops such records")
        self.path, self.line, self.reason, self.detail = path, line, reason, detail

    def __reduce__(self) -> tuple[type, tuple[str, int, str, str]]:
        # Rebuilt from its fields when a worker process sends it back.
        return BadRecord, (self.path, self.line, self.reason, self.detail)


# Under --on-error skip, more than this fraction of dropped records fails the run by default:
# a few broken lines are noise, a tenth of the corpus is a wrong --text-key or a damaged file.
DEFAULT_SKIP_FRACTION = 0.01


@dataclass(frozen=True)
class OutputLimits:
    """When a run that read everything still fails: it kept nothing, or it skipped too much."""

    allow_empty: bool = False
    max_skip_fraction: float = DEFAULT_SKIP_FRACTION


class ErrorPolicy:
    """Raise (fail) or count (skip) bad records; ``skipped`` maps reason -> count.

    ``warnings`` counts records that are valid but suspicious (identical DPO sides, duplicate RL
    ids, unknown verifiers): kept, reported by name and count on stderr and in the stats.
    """

    def __init__(self, mode: OnError = "fail", limits: OutputLimits | None = None) -> None:
        if mode not in ("fail", "skip"):
            raise ValueError(f"--on-error must be 'fail' or 'skip', got {mode!r}")
        self.mode = mode
        self.limits = limits or OutputLimits()
        self.skipped: Counter[str] = Counter()
        self.warnings: Counter[str] = Counter()

    def handle(self, error: BadRecord, count: int = 1) -> None:
        """Raise ``error`` under fail; otherwise count it ``count`` times (a corrupt file's rows)."""
        if self.mode == "fail":
            raise error
        self.skipped[error.reason] += count

    def warn(self, name: str, count: int = 1) -> None:
        self.warnings[name] += count

    def check_outcome(self, kept: int, unit: str, output: str) -> None:
        check_outcome(kept, self.skipped, self.limits, unit, output)


def check_outcome(kept: int, skipped: Counter[str], limits: OutputLimits, unit: str, output: str) -> None:
    """Fail before anything is published when nothing is left or too much was dropped."""
    dropped = sum(skipped.values())
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "no records read"
    if kept == 0 and not limits.allow_empty:
        raise DataPrepError(
            f"no {unit} to write", output, f"every input was empty or skipped ({reasons})",
            "check --input and the skip reasons; --allow-empty writes an empty output anyway",
        )  # fmt: skip
    fraction = dropped / (kept + dropped) if kept + dropped else 0.0
    if fraction > limits.max_skip_fraction:
        raise DataPrepError(
            "too many records skipped", output,
            f"{dropped} of {kept + dropped} ({fraction:.1%}) over --max-skip-fraction "
            f"{limits.max_skip_fraction} ({reasons})",
            "fix the inputs or raise --max-skip-fraction",
        )  # fmt: skip
