"""One error style for every command line: ``error: <what> (<where>): <why>; <fix>``, exit 2.

A bad recipe, a damaged checkpoint or a full disk is not a bug in this code, so the user gets one
line naming the file, key or tensor and what to do instead of a traceback; ``--debug`` or
``JOYAI_DEBUG=1`` brings the traceback back for the cases where it is one.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

EXIT_USER_ERROR = 2
DEBUG_FLAG = "--debug"


class UserError(Exception):
    """A problem the user can fix.  ``UserError(what, where, why, fix)`` renders the shared style;
    a single argument is a complete message (the older error classes still build those)."""

    def __init__(self, what: str, where: str | None = None, why: str | None = None, fix: str | None = None):
        super().__init__(what)
        self.what, self.where, self.why, self.fix = what, where, why, fix

    def __str__(self) -> str:
        text = self.what
        if self.where:
            text += f" ({self.where})"
        if self.why:
            text += f": {self.why}"
        if self.fix:
            text += f"; {self.fix}"
        return text


# Below this much space left, a failed write is taken as a full disk: Megatron's writer processes
# report ENOSPC as "Worker failure" (or a zip "unexpected pos"), dropping the errno.
_NEARLY_FULL_BYTES = 1 << 20


def is_disk_full(err: BaseException, path: str | os.PathLike | None = None) -> bool:
    """ENOSPC anywhere in the exception chain, or (given the path written) no space left there."""
    if path is not None:
        existing = Path(path)
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        with contextlib.suppress(OSError):
            if shutil.disk_usage(existing).free < _NEARLY_FULL_BYTES:
                return True
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "Disk quota exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def disk_full_error(path: str | os.PathLike, err: BaseException) -> UserError:
    return UserError(
        "disk full (ENOSPC)",
        str(path),
        f"no space left while writing ({type(err).__name__})",
        "free space on that file system or point the output elsewhere; nothing partial was kept",
    )


def debug_enabled(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get("JOYAI_DEBUG", "") not in ("", "0")


def cli_entry(main: Callable[[list[str]], int]) -> Callable[..., int]:
    """Decorate a command's ``main(argv)`` so that it runs through :func:`run_cli` and may be called
    with no arguments (``sys.argv``), as console scripts and ``python -m`` do."""

    @functools.wraps(main)
    def entry(argv: list[str] | None = None) -> int:
        return run_cli(main, argv)

    return entry


def run_cli(main: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """Run ``main(argv without --debug)``; a ``UserError`` or a full disk prints one line, exit 2.
    Without ``--debug`` the known, uninformative dependency warnings are silenced
    (``known_warnings.py``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    if not debug:
        from joyai_megatron.known_warnings import silence_known_warnings

        silence_known_warnings()
    try:
        return main(argv)
    except (UserError, OSError) as err:
        if debug or not (isinstance(err, UserError) or is_disk_full(err)):
            raise
        message = (
            err if isinstance(err, UserError) else disk_full_error(getattr(err, "filename", "") or "", err)
        )
        print(f"error: {message}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
