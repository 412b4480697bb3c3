"""Which isolation a run gets, and the bubblewrap command line that provides it.

Under bubblewrap a sandboxed process sees: the system's runtime directories (/usr, /lib*, /bin) and
the Python installation read-only, this package's runtime scripts read-only, its one input file
read-only, a private size-capped tmpfs as working directory (/scratch) and another as /tmp, a
private /proc and a minimal /dev. Nothing else exists in its mount namespace: no checkpoint,
data, home or credential paths. It has fresh PID, network (loopback only, down), IPC and UTS
namespaces; it dies with the process that started it, and killing that process tears down the PID
namespace and every descendant, setsid() or not.

Without bubblewrap the code would run with the trainer's file-system access, so runs are refused
unless the recipe opts in with ``rl.unsafe_code_execution: true`` (``set_unsafe_code_execution``),
which logs a loud warning: never a silent fallback.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

RUNTIME_DIR = Path(__file__).resolve().parent / "runtime"
SANDBOX_RUNTIME = "/sandbox/runtime"
SANDBOX_INPUT = "/sandbox/input"
SCRATCH = "/scratch"
# The interpreter without the trainer's virtual environment: the code gets the standard library.
PYTHON = os.path.realpath(sys.executable)
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
SETUP_HINT = (
    "install bubblewrap (as root: bash scripts/setup_bwrap.sh, i.e. apt-get install bubblewrap; it also "
    "needs user namespaces when the trainer is not root), or set rl.unsafe_code_execution: true to run "
    "model-written code with the trainer's own file-system and network access"
)

_unsafe_allowed = False


class SandboxUnavailableError(RuntimeError):
    """Code rewards were asked for but no isolation is available and unsafe execution is not allowed."""


def set_unsafe_code_execution(allowed: bool) -> None:
    """The recipe's ``rl.unsafe_code_execution``: allow runs without isolation (loudly)."""
    global _unsafe_allowed
    _unsafe_allowed = allowed
    if allowed and not bubblewrap_available():
        logger.warning(
            "!!! rl.unsafe_code_execution=true and bubblewrap is unusable: model-written code will run "
            "with this process's file-system and network access and can overwrite checkpoints or read "
            "credentials. To contain it: %s",
            SETUP_HINT,
        )


@contextlib.contextmanager
def unsafe_code_execution() -> Iterator[None]:
    """Allow unisolated runs inside the block (benchmarks and tests compare against them)."""
    previous = _unsafe_allowed
    set_unsafe_code_execution(True)
    try:
        yield
    finally:
        set_unsafe_code_execution(previous)


def use_isolation(isolated: bool | None) -> bool:
    """Resolve a run's ``isolated`` argument: None means bubblewrap when it works."""
    if isolated or (isolated is None and bubblewrap_available()):
        if not bubblewrap_available():
            raise SandboxUnavailableError(
                f"isolation was required but bubblewrap is unusable here: {SETUP_HINT}"
            )
        return True
    if not _unsafe_allowed:
        reason = "isolation is off" if isolated is False else "bubblewrap is unusable here"
        raise SandboxUnavailableError(f"refusing to run model-written code: {reason}; {SETUP_HINT}")
    return False


@functools.cache
def bubblewrap_available() -> bool:
    """Whether the full sandbox starts here (checked once per process)."""
    if shutil.which("bwrap") is None:
        return False
    probe = bwrap_command([PYTHON, "-E", "-s", "-c", "pass"], {})
    try:
        result = subprocess.run(probe, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if result.returncode != 0:
        logger.warning(
            "bubblewrap is installed but fails: %s", result.stderr.decode(errors="replace").strip()
        )
    return result.returncode == 0


def sandbox_uid() -> int | None:
    """A fresh uid for a process started as root in the sandbox (see runtime/limits.py); None when
    the trainer is not root (bubblewrap then maps the trainer's uid in a user namespace of the run's
    own, where the kernel counts RLIMIT_NPROC per namespace)."""
    return (1 << 20) + secrets.randbelow(1 << 30) if os.geteuid() == 0 else None


def bwrap_command(argv: list[str], inputs: dict[str, str], scratch_mb: int = 64) -> list[str]:
    """``argv`` inside a fresh sandbox; ``inputs`` maps host files to read-only paths inside."""
    command = [
        shutil.which("bwrap") or "bwrap",
        "--die-with-parent", "--new-session",
        "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
    ]  # fmt: skip
    if os.geteuid() == 0:  # the runtime drops to a fresh uid, which needs these two for an instant
        command += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        command += ["--unshare-user"]
    for top in _SYSTEM_DIRS:
        if os.path.islink(top):
            command += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            command += ["--ro-bind", top, top]
    binds = {str(RUNTIME_DIR): SANDBOX_RUNTIME, **inputs}
    prefix = os.path.realpath(sys.base_prefix)
    if not prefix.startswith("/usr/"):
        binds[prefix] = prefix
    made: set[str] = set()
    for host, inside in binds.items():
        # bubblewrap would make missing parents 0700, out of reach of the sandbox's own uid.
        for parent in reversed(Path(inside).parents[:-1]):
            if str(parent) not in made:
                made.add(str(parent))
                command += ["--perms", "0755", "--dir", str(parent)]
        command += ["--ro-bind", host, inside]
    size = str(scratch_mb * 1024 * 1024)
    command += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", size, "--tmpfs", "/dev/shm"]
    command += ["--perms", "1777", "--size", size, "--tmpfs", "/tmp"]
    command += ["--perms", "1777", "--size", size, "--tmpfs", SCRATCH, "--chdir", SCRATCH]
    # The root and /dev are tmpfs without a size cap, writable by the sandbox's owner in a user
    # namespace: read-only, so only the capped tmpfs mounts take writes.
    command += ["--remount-ro", "/dev", "--remount-ro", "/"]
    command += ["--clearenv", *_setenv(sandbox_env(SCRATCH)), "--", *argv]
    return command


def sandbox_env(home: str) -> dict[str, str]:
    """The whole environment of a sandboxed process: nothing of the trainer's."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": "/tmp" if home == SCRATCH else home,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def _setenv(env: dict[str, str]) -> list[str]:
    return [arg for key, value in env.items() for arg in ("--setenv", key, value)]
