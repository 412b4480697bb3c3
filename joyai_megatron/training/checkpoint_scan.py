"""What a checkpoint directory holds, judged from the checkpoints themselves, not from one file.

The tracker (``latest_checkpointed_iteration.txt``) is a hint written after each save; the
``COMPLETE`` marker inside each ``iter_*`` directory is the evidence (it is written last, before
the rename).  A deleted, emptied or garbled tracker must never make a run start from scratch and
then prune the checkpoints it did not see, so resume and conversion both pick the newest
``iter_*`` with a marker and only report when the tracker disagrees.  Pure Python: conversion uses
it without Megatron.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from joyai_megatron.checksums import MANIFEST, ManifestError, check_files, hash_directory, read_manifest
from joyai_megatron.errors import UserError

TRACKER = "latest_checkpointed_iteration.txt"
COMPLETE = "COMPLETE"
ITER_RE = re.compile(r"^iter_(\d{7})$")


class CheckpointError(UserError):
    """A checkpoint (directory) that cannot be used as asked; names the file and the way out."""


def iter_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def seal(path: Path, iteration: int, threads: int = 4) -> None:
    """Finish a checkpoint written by a tool rather than the trainer (``convert from-hf``, ``merge``):
    its checksum manifest, then the ``COMPLETE`` marker that resume and conversion look for."""
    hash_directory(path, threads)
    (path / COMPLETE).write_text(str(iteration))


@dataclass
class CheckpointScan:
    """The ``iter_*`` directories under one root and what the tracker says about them."""

    root: Path
    complete: list[int] = field(default_factory=list)  # ascending steps with a COMPLETE marker
    incomplete: list[Path] = field(default_factory=list)  # iter_* without the marker
    tracker: str | None = None  # the tracker's text, None when the file is absent

    @property
    def newest(self) -> int | None:
        return self.complete[-1] if self.complete else None

    def previous(self, step: int) -> int | None:
        """The newest complete step before ``step`` (the fallback offered when ``step`` is bad)."""
        older = [s for s in self.complete if s < step]
        return older[-1] if older else None

    def tracker_note(self) -> str | None:
        """Why the tracker cannot be trusted here, or None when it names the newest checkpoint."""
        newest = self.newest
        if self.tracker is None:
            return None if newest is None else f"{TRACKER} is missing"
        text = self.tracker.strip()
        if not text.isdigit():
            return f"{TRACKER} is {'empty' if not text else 'garbled (' + repr(text[:40]) + ')'}"
        if int(text) != newest:
            return f"{TRACKER} names step {int(text)}, the newest complete checkpoint is {newest}"
        return None


def scan(root: str | os.PathLike) -> CheckpointScan:
    root = Path(root)
    result = CheckpointScan(root)
    if not root.is_dir():
        return result
    for entry in sorted(root.iterdir()):
        m = ITER_RE.match(entry.name)
        if m and entry.is_dir():
            if is_complete(entry):
                result.complete.append(int(m.group(1)))
            else:
                result.incomplete.append(entry)
    tracker = root / TRACKER
    if tracker.is_file():
        result.tracker = tracker.read_text(errors="replace")
    return result


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint root (its newest complete ``iter_*``) or one complete ``iter_*`` directory."""
    path = Path(path)
    if path.name.startswith("iter_") and path.is_dir():
        require_complete(path)
        return path
    found = scan(path)
    if found.newest is None:
        where = str(path)
        if not path.is_dir():
            raise CheckpointError("no checkpoint", where, "the directory does not exist", "check the path")
        why = (
            f"{len(found.incomplete)} iter_* directories, none with a {COMPLETE} marker"
            if found.incomplete
            else "no iter_* directory"
        )
        raise CheckpointError("no complete checkpoint", where, why, "pass a directory a finished save wrote")
    return iter_dir(path, found.newest)


def require_complete(path: Path) -> None:
    """Refuse an ``iter_*.tmp`` (a save in progress or killed) or a directory without its marker."""
    if path.name.endswith(".tmp"):
        raise CheckpointError(
            "unfinished checkpoint",
            str(path),
            "an iter_*.tmp directory is a save that is still running or was killed",
            f"use the complete iter_* beside it or the checkpoint root {path.parent}",
        )
    if not is_complete(path):
        raise CheckpointError(
            "incomplete checkpoint",
            str(path / COMPLETE),
            "the marker a finished save writes last is missing, so the save may not have finished",
            "use an older complete iter_* (or the checkpoint root); if another tool wrote it and you know it is "
            f"whole, create the marker: echo {path.name[5:].lstrip('0') or '0'} > {path / COMPLETE}",
        )


def tensors_in_file(path: Path, name: str) -> list[str]:
    """The stored tensors and objects whose bytes live in shard file ``name`` (from ``.metadata``)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(str(path)).read_metadata().storage_data
    except Exception:  # a damaged .metadata: the file alone is all that can be named
        return []
    return sorted({index.fqn for index, info in storage.items() if info.relative_path == name})


def damaged_checkpoint_error(path: Path, name: str | None, why: str) -> CheckpointError:
    """Name the file (and the tensors in it) and offer the previous complete checkpoint, never use it."""
    where = str(path if name is None else path / name)
    tensors = tensors_in_file(path, name) if name and name.endswith(".distcp") else []
    if tensors:
        where += f", tensor {tensors[0]}" + (f" and {len(tensors) - 1} more" if len(tensors) > 1 else "")
    match = ITER_RE.match(path.name)
    previous = scan(path.parent).previous(int(match.group(1))) if match else None
    if previous is not None:
        fix = (
            f"the previous complete checkpoint is {iter_dir(path.parent, previous)}: to resume from it, move "
            f"this one aside (mv {path} {path}.damaged) and start the same command again"
        )
    elif match:
        fix = "no older complete checkpoint here; restore this one from a backup"
    else:
        fix = "restore the file from a backup or write this output again"
    return CheckpointError(f"{'checkpoint' if match else 'output'} damaged", where, why, fix)


def verify_directory(path: Path, contents: bool = True) -> str | None:
    """Check ``path`` against its ``checksums.json``, raising on the first damaged file.

    ``contents=False`` only compares sizes (catches truncation without reading a byte).  Returns a
    note when the directory has no manifest to check (written before manifests existed).
    """
    try:
        manifest = read_manifest(path)
    except ManifestError as err:
        raise damaged_checkpoint_error(path, MANIFEST, str(err)) from err
    if manifest is None:
        return f"{path} has no {MANIFEST} (written before checksums): not verified"
    problems = check_files(path, manifest, contents=contents)
    if problems:
        name, why = problems[0]
        more = f" (and {len(problems) - 1} more files)" if len(problems) > 1 else ""
        raise damaged_checkpoint_error(path, name, why + more)
    return None


@dataclass(frozen=True)
class StartPoint:
    """Where a run starts: ``path`` None means step 0 from a fresh initialisation."""

    path: Path | None
    resuming: bool  # path is this run's own checkpoint (counters and optimizer follow)
    note: str | None = None  # what the tracker got wrong, to print once


def start_point(directory: str | os.PathLike, load: str | None, allow_fresh_start: bool) -> StartPoint:
    """Resume from the newest complete checkpoint in ``directory``, else start from ``load``.

    A directory whose checkpoints are all unusable (no ``COMPLETE`` marker, or only a tracker
    naming steps that are gone) stops the run instead of starting over: its later saves would
    overwrite and prune what is there.
    """
    found = scan(directory)
    if found.newest is not None:
        note = found.tracker_note()
        if note:
            note += f"; resuming from the newest complete checkpoint {iter_dir(directory, found.newest)}"
        return StartPoint(iter_dir(directory, found.newest), True, note)
    leftovers = [p.name for p in found.incomplete]
    if found.tracker is not None and found.tracker.strip():
        leftovers.append(f"{TRACKER} ({found.tracker.strip()[:20]!r})")
    if leftovers and not allow_fresh_start:
        raise CheckpointError(
            "refusing to start from scratch",
            str(directory),
            f"checkpoint.dir holds {', '.join(leftovers[:4])} but no iter_* with a {COMPLETE} marker",
            "move them away or point checkpoint.dir elsewhere; set checkpoint.allow_fresh_start=true to train "
            "from step 0 in this directory anyway (its saves then replace what is there)",
        )
    if load:
        return StartPoint(resolve_checkpoint(load), False)
    return StartPoint(None, False)
