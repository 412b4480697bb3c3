"""Per-file SHA-256 manifests (``checksums.json``) written beside checkpoints and HF exports.

A truncated or bit-flipped file otherwise loads silently or fails deep inside a reader with no file
name.  Writers hash each file right after writing it (the bytes are still in the page cache, so this
costs a read from memory, spread over ranks and threads); readers compare before trusting anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST = "checksums.json"
_CHUNK = 8 << 20

FileDigest = dict[str, int | str]  # {"bytes": size, "sha256": hex}


def file_digest(path: str | os.PathLike) -> FileDigest:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": h.hexdigest()}


def digest_files(directory: Path, names: list[str], threads: int = 4) -> dict[str, FileDigest]:
    """Digests of ``names`` (relative to ``directory``); hashlib releases the GIL, so threads help."""
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(names)))) as pool:
        digests = pool.map(lambda n: file_digest(directory / n), names)
        return dict(zip(names, digests, strict=True))


# Not hashed: the manifest and markers themselves, and recipe.yaml, which users may edit (a moved
# tokenizer path) and which fails loudly, naming itself, when garbled.
UNHASHED = frozenset({MANIFEST, "COMPLETE", "recipe.yaml"})


def files_to_hash(directory: Path) -> list[str]:
    """Every regular file under ``directory`` (relative, sorted) except those in ``UNHASHED``."""
    skip = UNHASHED
    return sorted(
        str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name not in skip
    )


def write_manifest(directory: Path, digests: dict[str, FileDigest]) -> Path:
    target = directory / MANIFEST
    tmp = directory / (MANIFEST + ".tmp")
    payload = {"algorithm": "sha256", "files": dict(sorted(digests.items()))}
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, target)
    return target


def hash_directory(directory: Path, threads: int = 4) -> Path:
    """Hash every file of ``directory`` and write its manifest (single-writer outputs)."""
    return write_manifest(directory, digest_files(directory, files_to_hash(directory), threads))


class ManifestError(ValueError):
    """A ``checksums.json`` that cannot be read: the directory's integrity is unknown."""


def read_manifest(directory: Path) -> dict[str, FileDigest] | None:
    """The recorded digests, or None when the directory predates manifests."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
        return {
            str(name): {"bytes": int(d["bytes"]), "sha256": str(d["sha256"])} for name, d in files.items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ManifestError(f"{path}: unreadable checksum manifest ({type(err).__name__}: {err})") from err


def check_files(
    directory: Path, expected: dict[str, FileDigest], threads: int = 4, contents: bool = True
) -> list[tuple[str, str]]:
    """``(file, problem)`` for each listed file that is missing, truncated, extended or (with
    ``contents``) altered."""
    problems: list[tuple[str, str]] = []
    present = []
    for name, want in expected.items():
        path = directory / name
        if not path.is_file():
            problems.append((name, "missing"))
            continue
        size, written = path.stat().st_size, int(want["bytes"])
        if size != written:
            kind = "truncated" if size < written else "longer than written"
            problems.append((name, f"{kind}: {size} bytes on disk, {written} written"))
            continue
        present.append(name)
    if present and contents:
        for name, got in digest_files(directory, present, threads).items():
            if got["sha256"] != expected[name]["sha256"]:
                problems.append((name, "contents changed since it was written (sha256 differs, same size)"))
    return sorted(problems)
