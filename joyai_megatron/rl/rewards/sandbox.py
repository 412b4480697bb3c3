"""Run untrusted Python (a model's solution plus reference tests) in a locked-down subprocess.

The model's code never runs in the trainer's process. Each run gets:
- a fresh temporary working directory (deleted afterwards) that is also HOME and TMPDIR;
- a stripped environment (PATH, HOME, TMPDIR, LANG, PYTHONPATH for the sandbox's sitecustomize);
- resource limits set before the code starts, inherited by anything it spawns: address space
  (RLIMIT_AS, so allocations fail with MemoryError), CPU seconds, file size, no core dumps;
- a wall-clock limit, after which the whole process tree is killed (without namespaces only the
  process group is, so a child that calls setsid() escapes the kill);
- no network: when `unshare` works (root, or user namespaces), fresh network and PID namespaces,
  so only a down loopback exists and killing the namespace's init kills every descendant; in
  addition (and alone where namespaces are unavailable) a sitecustomize that replaces the socket
  constructors, which also covers Python subprocesses the code starts. The socket patch is
  best-effort (C extensions or other binaries bypass it); the namespace is the real barrier.

A run passes only if the runner prints a fresh random token after the tests finish, which the
parent receives over stdin and the code never sees through any API meant for it. So exiting
early with status 0 (`sys.exit(0)`, `os._exit(0)`, `os.execv("/bin/true", ...)`) fails, a common
reward hack in code RL. The code shares the runner's interpreter, so a program written to dig the
token out of the runner's frame could still forge a pass: tests must therefore be plain asserts
(or harnesses that do not exit), and the token check raises the bar rather than closing it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

_UNSHARE = ("unshare", "--net", "--pid", "--fork", "--kill-child", "--")
_OUTPUT_TAIL = 4000
_MAX_FILE_BYTES = 16 * 1024 * 1024

_SITECUSTOMIZE = """
import socket as _socket_module
import _socket


def _no_network(*args, **kwargs):
    raise PermissionError("network access is disabled in the sandbox")


class _NoSocket:
    def __init__(self, *args, **kwargs):
        _no_network()


for _name in ("socket", "SocketType"):
    setattr(_socket_module, _name, _NoSocket)
    setattr(_socket, _name, _NoSocket)
for _name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
    setattr(_socket_module, _name, _no_network)
"""

_RUNNER = """
import resource
import sys


def main():
    memory_bytes, cpu_seconds, file_bytes = (int(v) for v in sys.argv[1:4])
    token = sys.stdin.readline().strip()
    sys.stdin.close()
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    namespace = {"__name__": "__main__"}
    for path in ("solution.py", "tests.py"):
        with open(path, encoding="utf-8") as handle:
            exec(compile(handle.read(), path, "exec"), namespace)
    sys.stdout.flush()
    print("\\n" + token, flush=True)


main()
"""


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run: passed means exit status 0 within the time limit."""

    passed: bool
    timed_out: bool
    returncode: int | None
    output: str


@functools.cache
def network_namespace_available() -> bool:
    """Whether `unshare` can create network and PID namespaces here (checked once per process)."""
    if shutil.which("unshare") is None:
        return False
    try:
        probe = subprocess.run([*_UNSHARE, "true"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the run's process group, leftovers included (with namespaces, killing the PID
    namespace's init also takes down descendants that left the group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def run_python_tests(
    solution: str,
    tests: str,
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    use_namespace: bool | None = None,
    block_sockets: bool = True,
    python: str = sys.executable,
) -> SandboxResult:
    """Execute `solution` then `tests` in one fresh namespace (as if one file) in the sandbox.

    use_namespace: None = use network/PID namespaces when available; True = require them.
    block_sockets: also install the socket-blocking sitecustomize (defence in depth).
    """
    if use_namespace is None:
        use_namespace = network_namespace_available()
    elif use_namespace and not network_namespace_available():
        raise RuntimeError("network namespaces requested but `unshare --net --pid` is not usable here")
    with tempfile.TemporaryDirectory(prefix="joyai_sandbox_") as workdir:
        work = Path(workdir)
        site_dir = work / ".sandbox_site"
        site_dir.mkdir()
        if block_sockets:
            (site_dir / "sitecustomize.py").write_text(_SITECUSTOMIZE, encoding="utf-8")
        (work / "runner.py").write_text(_RUNNER, encoding="utf-8")
        (work / "solution.py").write_text(solution, encoding="utf-8")
        (work / "tests.py").write_text(tests, encoding="utf-8")
        env = {
            "PATH": os.defpath,
            "HOME": workdir,
            "TMPDIR": workdir,
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(site_dir),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        limits = [str(memory_mb * 1024 * 1024), str(math.ceil(timeout_s) + 1), str(_MAX_FILE_BYTES)]
        command = [python, "-s", "runner.py", *limits]
        if use_namespace:
            command = [*_UNSHARE, *command]
        token = secrets.token_hex(16)
        log_path = work / ".output"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command,
                cwd=workdir,
                env=env,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            with contextlib.suppress(BrokenPipeError):
                process.stdin.write(f"{token}\n".encode())
                process.stdin.close()
            try:
                returncode: int | None = process.wait(timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                returncode, timed_out = None, True
            _kill_tree(process)
        with open(log_path, "rb") as log:
            log.seek(max(0, log_path.stat().st_size - _OUTPUT_TAIL))
            output = log.read().decode("utf-8", errors="replace").rstrip("\n")
    finished = output.endswith(token)
    if finished:
        output = output[: -len(token)].rstrip("\n")
    passed = returncode == 0 and finished
    return SandboxResult(passed=passed, timed_out=timed_out, returncode=returncode, output=output)
