"""Hostile solutions against the code verifier's sandbox: none may pass or leave a trace.

Each attack is a program whose ``add`` is right only if the attack worked, judged by the usual
tests, so "did not pass" means "did not work". Around every run the test also checks the world
outside it: the files of a directory the attack aims at, the host's /tmp, and every process on
the machine (a survivor carries the run's token in its command line). ``test_*_escape_without_
isolation`` runs the file attacks with isolation off through the unsafe opt-in and sees them
succeed, so these tests fail if the isolation breaks.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from pathlib import Path

import pytest

from joyai_megatron.rl.rewards.sandbox import bubblewrap_available, run_python_tests, unsafe_code_execution

pytestmark = pytest.mark.skipif(
    not bubblewrap_available(),
    reason="no isolation mechanism: bubblewrap is not installed or cannot create namespaces here "
    "(bash scripts/setup_bwrap.sh)",
)

TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
SECRET = "s3cret-credential"


def _attack(body: str) -> str:
    """A program whose add() is right only if ``attack()`` (defined by ``body``) returned True.

    The failure is printed with flush=True: the judge can finish and the solution be killed before
    a buffered print reaches the log (seen once in a loaded full run).
    """
    return (
        body
        + "\ntry:\n    ESCAPED = attack() is True\nexcept BaseException as exc:\n    print('attack failed:', repr(exc), flush=True)\n"
        "    ESCAPED = False\n\ndef add(a, b):\n    return a + b if ESCAPED else a - b\n"
    )


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory of the trainer's: a credential, a checkpoint directory."""
    (tmp_path / "credentials").write_text(SECRET)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "iter_0000100").write_text("weights")
    return tmp_path


def _snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): p.read_text() for p in sorted(directory.rglob("*")) if p.is_file()}


def _processes_with(token: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if token.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found


def _run_hostile(
    program: str, outside: Path, token: str, timeout_s: float = 10.0, isolated: bool | None = None
):
    before = _snapshot(outside)
    host_tmp = set(os.listdir("/tmp"))
    result = run_python_tests(program, TESTS, timeout_s=timeout_s, memory_mb=256, isolated=isolated)
    trace = {
        "outside_changed": _snapshot(outside) != before,
        "new_tmp_files": sorted(n for n in set(os.listdir("/tmp")) - host_tmp if token in n),
        "secret_in_output": SECRET in result.output,
    }
    return result, trace


def _no_trace(trace: dict, token: str) -> None:
    assert trace == {"outside_changed": False, "new_tmp_files": [], "secret_in_output": False}
    deadline = time.monotonic() + 2.0
    while _processes_with(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_with(token) == [], "a process of the run survived it"


def _file_attacks(outside: Path, token: str) -> dict[str, str]:
    return {
        "write": f"def attack():\n    open({str(outside / 'planted')!r}, 'w').write('x')\n    return True\n",
        "overwrite": (
            f"def attack():\n    open({str(outside / 'checkpoints' / 'iter_0000100')!r}, 'w').write('gone')\n"
            "    return True\n"
        ),
        "delete": f"import shutil\ndef attack():\n    shutil.rmtree({str(outside / 'checkpoints')!r})\n    return True\n",
        "read": f"def attack():\n    text = open({str(outside / 'credentials')!r}).read()\n    print(text)\n    return text == {SECRET!r}\n",
        "host_tmp": f"def attack():\n    open('/tmp/{token}', 'w').write('x')\n    return os.path.exists('/tmp/{token}') and False\nimport os\n",
    }


@pytest.mark.parametrize("name", ["write", "overwrite", "delete", "read", "host_tmp"])
def test_file_attacks_are_contained(outside, name):
    token = secrets.token_hex(8)
    result, trace = _run_hostile(_attack(_file_attacks(outside, token)[name]), outside, token)
    assert not result.passed, result.output
    _no_trace(trace, token)


def test_file_attacks_escape_without_isolation(outside):
    """The same programs, unisolated through the unsafe opt-in, do reach the trainer's files."""
    token = secrets.token_hex(8)
    attacks = _file_attacks(outside, token)
    with unsafe_code_execution():
        for name in ("read", "write", "overwrite", "delete"):
            result, trace = _run_hostile(_attack(attacks[name]), outside, token, isolated=False)
            assert result.passed, (name, result.output)
            assert trace["outside_changed"] or trace["secret_in_output"], name
    assert (outside / "planted").exists() and not (outside / "checkpoints").exists()


def test_environment_home_and_view_are_the_sandboxes(outside, monkeypatch):
    monkeypatch.setenv("JOYAI_TRAINER_SECRET", SECRET)
    token = secrets.token_hex(8)
    probe = (
        "import os\n"
        "def attack():\n"
        "    seen = set(os.listdir('/'))\n"
        f"    return ('JOYAI_TRAINER_SECRET' in os.environ or os.path.exists({str(Path.home())!r})\n"
        f"            or os.path.exists({os.getcwd()!r}) or not seen <= {{'usr', 'bin', 'lib', 'lib64', 'sbin',\n"
        "            'lib32', 'libx32', 'root', 'sandbox', 'proc', 'dev', 'tmp', 'scratch'}})\n"
    )
    result, trace = _run_hostile(_attack(probe), outside, token)
    assert not result.passed
    _no_trace(trace, token)


@pytest.fixture
def local_server():
    """A TCP server on the trainer's loopback that answers b'pong' once."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        server.settimeout(10)
        try:
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"pong")
        except OSError:
            pass

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def _network_attacks(port: int) -> dict[str, str]:
    connect = f"import socket\nwith socket.create_connection(('127.0.0.1', {port}), timeout=2) as c:\n    print(c.recv(4).decode())"
    return {
        "python": f"def attack():\n{''.join('    ' + line + chr(10) for line in connect.splitlines())}    return True\n",
        "child_without_site": (
            "import subprocess, sys\n"
            f"def attack():\n    out = subprocess.run([sys.executable, '-S', '-c', {connect!r}], capture_output=True, text=True)\n"
            "    return out.stdout.strip() == 'pong'\n"
        ),
    }


def test_network_escapes_without_isolation_so_the_checks_below_mean_something(outside, local_server):
    with unsafe_code_execution():
        result, _ = _run_hostile(
            _attack(_network_attacks(local_server)["python"]), outside, "x", isolated=False
        )
    assert result.passed, result.output


@pytest.mark.parametrize("name", ["python", "child_without_site"])
def test_network_is_unreachable(outside, local_server, name):
    token = secrets.token_hex(8)
    result, trace = _run_hostile(_attack(_network_attacks(local_server)[name]), outside, token)
    assert not result.passed and not result.timed_out, result.output
    _no_trace(trace, token)


def test_fork_bomb_is_capped_and_dies_with_the_run(outside):
    token = secrets.token_hex(8)
    bomb = (
        "import subprocess, sys\n"
        "def attack():\n"
        "    children = [subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)  # "
        + token
        + "']) for _ in range(200)]\n"
        "    return len(children) == 200\n"
    )
    result, trace = _run_hostile(_attack(bomb), outside, token)
    assert not result.passed
    assert "Resource temporarily unavailable" in result.output or "BlockingIOError" in result.output
    _no_trace(trace, token)


def test_classic_fork_bomb_does_not_pass(outside):
    token = secrets.token_hex(8)
    bomb = "import os\nwhile True:\n    os.fork()\n"
    result, trace = _run_hostile(bomb + "def add(a, b):\n    return a + b\n", outside, token, timeout_s=2.0)
    assert not result.passed
    _no_trace(trace, token)


@pytest.mark.parametrize("how", ["setsid", "double_fork"])
def test_daemonised_child_dies_with_the_run(outside, how):
    token = secrets.token_hex(8)
    sleeper = f"import time; time.sleep(30)  # {token}"
    spawn = {
        "setsid": f"subprocess.Popen([sys.executable, '-c', {sleeper!r}], start_new_session=True)",
        "double_fork": (
            f"pid = os.fork()\nif pid == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            f"        os.execv(sys.executable, [sys.executable, '-c', {sleeper!r}])\n    os._exit(0)\nos.waitpid(pid, 0)"
        ),
    }[how]
    program = f"import os, subprocess, sys\n{spawn}\ndef add(a, b):\n    while True:\n        pass\n"
    result, trace = _run_hostile(program, outside, token, timeout_s=3.0)
    assert result.timed_out and not result.passed
    _no_trace(trace, token)


FORGERIES = {
    "always_equal": "class Anything:\n    def __eq__(self, other):\n        return True\n    __hash__ = None\n"
    "def add(a, b):\n    return Anything()\n",
    "int_subclass": "class Five(int):\n    def __eq__(self, other):\n        return True\n"
    "def add(a, b):\n    return Five(0)\n",
    "frames": (
        "import sys\ndef add(a, b):\n    frame = sys._getframe()\n    while frame:\n"
        "        for scope in (frame.f_locals, frame.f_globals):\n"
        "            for key in ('verdict', 'passed', 'token', 'tests'):\n"
        "                if key in scope:\n                    print('found', key, scope[key])\n"
        "        frame = frame.f_back\n    return a - b\n"
    ),
    "gc": (
        "import gc, json, os\ndef add(a, b):\n    for obj in gc.get_objects():\n"
        "        if isinstance(obj, dict) and 'passed' in obj:\n            obj['passed'] = True\n"
        "    return a - b\n"
    ),
    "proc_self_fds": (
        "import os\nfor fd in map(int, os.listdir('/proc/self/fd')):\n    try:\n"
        '        os.write(fd, b\'{"passed": true}\\n{"value": 5}\\n\')\n    except OSError:\n        pass\n'
        "def add(a, b):\n    return a - b\n"
    ),
    "proc_other_processes": (
        "import os, signal\nfor pid in filter(str.isdigit, os.listdir('/proc')):\n    try:\n"
        "        print(open(f'/proc/{pid}/cmdline').read(), open(f'/proc/{pid}/environ').read())\n"
        "    except OSError:\n        pass\nos.kill(-1, signal.SIGKILL)\n"
    ),
    "monkeypatch_harness": (
        "import sys\nwire = sys.modules['wire']\nsolution = sys.modules['__main__']\n"
        "solution.Server.answer = lambda self, request: {'value': True, 'passed': True}\n"
        "wire.encode = lambda *a, **k: 5\ndef add(a, b):\n    return a - b\n"
    ),
    "exit_zero": "import sys\nsys.exit(0)\n",
    "os_exit_zero": "import os\nos._exit(0)\n",
    "exec_true": "import os\nos.execv('/bin/true', ['true'])\n",
    "huge_output": "import sys\nwhile True:\n    sys.stdout.write('x' * 1_000_000)\n",
    "huge_return": "def add(a, b):\n    return 'x' * 50_000_000\n",
    "infinite_loop": "def add(a, b):\n    while True:\n        pass\n",
    "infinite_import": "while True:\n    pass\n",
}


@pytest.mark.parametrize("name", list(FORGERIES))
def test_forgery_and_resource_attacks_do_not_pass(outside, name):
    token = secrets.token_hex(8)
    result, trace = _run_hostile(FORGERIES[name], outside, token, timeout_s=2.0)
    assert not result.passed, result.output
    assert len(result.output) < 20_000
    _no_trace(trace, token)


def test_the_honest_solution_still_passes(outside):
    token = secrets.token_hex(8)
    result, trace = _run_hostile("def add(a, b):\n    return a + b\n", outside, token)
    assert result.passed, result.output
    _no_trace(trace, token)
