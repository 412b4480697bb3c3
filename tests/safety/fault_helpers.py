"""Fault injection for the safety suite: damage files the way disks and users do."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from tests.joyai_helpers import write_mock_recipe

# The recipe every copy runs with: ZeRO-1 so checksums cover a multi-rank distributed-optimizer
# save; a checkpoint per step so a previous complete one exists to fall back to.
SECTIONS = {
    "parallel": {"distributed_optimizer": True},
    "checkpoint": {"save_interval": 1, "keep_last": 3},
    "model": {"mtp_enabled": False},
}


@dataclass(frozen=True)
class Run:
    recipe: Path
    ckpt: Path

    def copy_to(self, directory: Path) -> Run:
        """A private copy of the checkpoints with a recipe that writes only under ``directory``."""
        recipe = write_mock_recipe(directory, **SECTIONS)
        shutil.copytree(self.ckpt, directory / "ckpt")
        return Run(recipe, directory / "ckpt")


def flip_bit(path: Path, offset: int | None = None) -> None:
    """Same size, one bit different: what a bad disk or a stray write leaves."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def assert_one_line_error(stderr: str, *needles: str) -> None:
    """The shared CLI style: an ``error:`` line naming what it should, and no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert lines, stderr[-3000:]
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
