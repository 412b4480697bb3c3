"""Code reward and its sandbox: limits, network isolation, early-exit hacks, process cleanup."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from joyai_megatron.rl.rewards import code_tests, get_reward
from joyai_megatron.rl.rewards.code_tests import extract_code
from joyai_megatron.rl.rewards.sandbox import network_namespace_available, run_python_tests

TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
needs_namespace = pytest.mark.skipif(
    not network_namespace_available(), reason="unshare --net --pid unavailable"
)


@pytest.fixture
def fast_code_reward(monkeypatch):
    monkeypatch.setattr(code_tests, "CODE_TIMEOUT_S", 2.0)
    monkeypatch.setattr(code_tests, "CODE_MEMORY_MB", 256)
    return get_reward("code")


def _fenced(code: str) -> str:
    return f"<think>plan</think>Here it is:\n```python\n{code}\n```\nDone."


def test_correct_code_scores_one_and_wrong_code_zero(fast_code_reward):
    assert fast_code_reward(_fenced("def add(a, b):\n    return a + b"), TESTS) == 1.0
    assert fast_code_reward(_fenced("def add(a, b):\n    return a - b"), TESTS) == 0.0
    assert fast_code_reward(_fenced("def add(a, b) return"), TESTS) == 0.0  # syntax error


def test_infinite_loop_is_killed_and_scores_zero(fast_code_reward):
    start = time.monotonic()
    assert fast_code_reward(_fenced("def add(a, b):\n    while True:\n        pass"), TESTS) == 0.0
    assert time.monotonic() - start < 6.0
    result = run_python_tests("while True:\n    pass", "", timeout_s=0.5)
    assert result.timed_out and not result.passed


@pytest.mark.parametrize(
    "bomb",
    [
        "blob = bytearray(2 * 1024**3)",  # one huge allocation
        "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024**2))",  # steady growth
    ],
)
def test_memory_bomb_is_stopped_and_scores_zero(fast_code_reward, bomb):
    code = f"{bomb}\ndef add(a, b):\n    return a + b"
    assert fast_code_reward(_fenced(code), TESTS) == 0.0
    result = run_python_tests(code, TESTS, memory_mb=256, timeout_s=5.0)
    assert not result.timed_out and "MemoryError" in result.output


@pytest.fixture
def local_server():
    """A TCP echo-once server on 127.0.0.1, reachable from this process's network namespace."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        server.settimeout(10)
        try:
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"pong")
        except OSError:
            pass

    threading.Thread(target=serve, daemon=True).start()
    yield port
    server.close()


def _network_solution(port: int) -> str:
    return (
        "import socket\n"
        f"with socket.create_connection(('127.0.0.1', {port}), timeout=2) as conn:\n"
        "    REPLY = conn.recv(4)\n"
        "def add(a, b):\n    return a + b\n"
    )


NETWORK_TESTS = TESTS + "assert REPLY == b'pong'\n"


def test_network_call_works_unsandboxed_so_the_check_below_is_meaningful(local_server):
    namespace: dict = {}
    exec(_network_solution(local_server) + NETWORK_TESTS, namespace)  # the trainer's own process
    assert namespace["REPLY"] == b"pong"


@pytest.mark.parametrize(
    "isolation",
    [
        pytest.param(dict(use_namespace=True, block_sockets=False), marks=needs_namespace, id="namespace"),
        pytest.param(dict(use_namespace=False, block_sockets=True), id="socket_block"),
        pytest.param(dict(), id="default"),
    ],
)
def test_network_call_is_blocked_and_scores_zero(local_server, isolation):
    result = run_python_tests(_network_solution(local_server), NETWORK_TESTS, timeout_s=5.0, **isolation)
    assert not result.passed and not result.timed_out
    assert "unreachable" in result.output or "disabled in the sandbox" in result.output


def test_default_reward_blocks_network(fast_code_reward, local_server):
    assert fast_code_reward(_fenced(_network_solution(local_server)), NETWORK_TESTS) == 0.0


@pytest.mark.parametrize(
    "hack",
    ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "import os\nos.execv('/bin/true', ['true'])"],
)
def test_exiting_early_with_status_zero_does_not_pass(fast_code_reward, hack):
    assert fast_code_reward(_fenced(hack), "assert False") == 0.0


def test_environment_is_stripped_and_directory_is_private(monkeypatch):
    monkeypatch.setenv("JOYAI_TRAINER_SECRET", "s3cret")
    tests = (
        "import os\n"
        "assert 'JOYAI_TRAINER_SECRET' not in os.environ\n"
        f"assert os.getcwd() != {os.getcwd()!r}\n"
        "assert sorted(os.listdir('.')) == ['.output', '.sandbox_site', 'runner.py', 'solution.py', 'tests.py']\n"
    )
    assert run_python_tests("", tests).passed


@needs_namespace
def test_processes_escaping_the_group_die_with_the_sandbox(tmp_path):
    marker = tmp_path / "survivor"
    child = f"import time; time.sleep(1.5); open({str(marker)!r}, 'w').write('alive')"
    code = (
        "import subprocess, sys\n"
        f"subprocess.Popen([sys.executable, '-c', {child!r}], start_new_session=True)\n"
        "while True:\n    pass\n"
    )
    assert run_python_tests(code, "", timeout_s=0.5).timed_out
    time.sleep(2.5)
    assert not marker.exists()


def test_code_extraction():
    assert extract_code("```python\na = 1\n```\ntext\n```py\nb = 2\n```") == "b = 2\n"
    assert extract_code("```bash\nls\n```\n```\nc = 3\n```") == "c = 3\n"
    assert extract_code("<think>```python\nx = 0\n```</think>y = 1") == "y = 1"
