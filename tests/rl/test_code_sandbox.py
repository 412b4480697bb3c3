"""Code rewards and their sandbox: verdicts, limits, the channel's codec, stdin/stdout judging,
and the refusal to run without isolation (hostile programs: test_sandbox_hostile.py)."""

from __future__ import annotations

import json
import math
import time

import pytest

from joyai_megatron.rl.rewards import code_tests, get_reward
from joyai_megatron.rl.rewards.code_tests import extract_code
from joyai_megatron.rl.rewards.sandbox import (
    SandboxUnavailableError,
    bubblewrap_available,
    isolation,
    run_python_program,
    run_python_tests,
    unsafe_code_execution,
)
from joyai_megatron.rl.rewards.sandbox.runtime.wire import MAX_DEPTH, WireError, decode, encode

TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
needs_bwrap = pytest.mark.skipif(not bubblewrap_available(), reason="bubblewrap unusable here")


@pytest.fixture
def fast_code_reward(monkeypatch):
    monkeypatch.setattr(code_tests, "CODE_TIMEOUT_S", 20.0)  # generous: CI machines can be loaded
    monkeypatch.setattr(code_tests, "CODE_MEMORY_MB", 256)
    return get_reward("code")


def _fenced(code: str) -> str:
    return f"<think>plan</think>Here it is:\n```python\n{code}\n```\nDone."


@needs_bwrap
def test_correct_code_scores_one_and_wrong_code_zero(fast_code_reward):
    assert fast_code_reward(_fenced("def add(a, b):\n    return a + b"), TESTS) == 1.0
    assert fast_code_reward(_fenced("def add(a, b):\n    return a - b"), TESTS) == 0.0
    assert fast_code_reward(_fenced("def add(a, b) return"), TESTS) == 0.0  # syntax error


@needs_bwrap
def test_tests_use_objects_exceptions_and_in_place_changes_through_the_channel():
    solution = (
        "class Stack:\n    def __init__(self):\n        self.items = []\n"
        "    def push(self, x):\n        self.items.append(x)\n        return self\n"
        "    def pop(self):\n        if not self.items:\n            raise IndexError('empty')\n"
        "        return self.items.pop()\n    def __len__(self):\n        return len(self.items)\n"
        "def sort_in_place(xs):\n    xs.sort()\n"
        "def stats(xs):\n    return {'n': len(xs), 'pair': (min(xs), max(xs)), 'set': set(xs), 'raw': bytes(xs)}\n"
        "LIMIT = 3\nPRIMES = [p for p in range(2, 300_000) if all(p % d for d in range(2, int(p**0.5) + 1))]\n"
    )
    tests = (
        "s = Stack().push(1).push(2)\nassert len(s) == 2 and s.items == [1, 2] and s.pop() == 2\n"
        "s.pop()\ntry:\n    s.pop()\nexcept IndexError as e:\n    assert 'empty' in str(e)\nelse:\n    raise AssertionError\n"
        "xs = [3, 1, 2]\nsort_in_place(xs)\nassert xs == [1, 2, 3]\n"
        "assert stats([1, 2, 2]) == {'n': 3, 'pair': (1, 2), 'set': {1, 2}, 'raw': b'\\x01\\x02\\x02'}\n"
        "assert LIMIT == 3 and s != Stack() and repr(s).startswith('<solution object')\n"
        "assert len(PRIMES) == 25997 and PRIMES[3] == 7  # a large table travels as a handle\n"
    )
    result = run_python_tests(solution, tests, timeout_s=20.0)
    assert result.passed, result.output


def test_wire_codec_round_trips_plain_data_and_rejects_the_rest():
    value = [
        None,
        True,
        3,
        2.5,
        math.inf,
        "s",
        b"\x00",
        bytearray(b"ab"),
        1 + 2j,
        (1, [2]),
        {"k": {3}},
        frozenset({4}),
    ]
    assert decode(json.loads(json.dumps(encode(value))), resolve=lambda n: n) == value
    assert encode([object()], lambda obj: 7) == [{"h": 7}]
    for bad in ({"x": 1}, {"d": [[[1], 2]]}, {"b": "not base64!"}, {"t": 1}, {"a": 1, "b": 2}):
        with pytest.raises(WireError):
            decode(bad, resolve=lambda n: n)
    nested: list = [1]
    for _ in range(MAX_DEPTH - 1):
        nested = [nested]  # MAX_DEPTH lists deep: allowed both ways
    assert decode(encode(nested), resolve=lambda n: n) == nested
    with pytest.raises(WireError, match="nested too deeply"):
        encode([nested])
    with pytest.raises(WireError, match="nested too deeply"):
        decode([json.loads(json.dumps(encode(nested)))], resolve=lambda n: n)


@needs_bwrap
def test_infinite_loop_is_killed_and_scores_zero(fast_code_reward, monkeypatch):
    monkeypatch.setattr(code_tests, "CODE_TIMEOUT_S", 2.0)
    start = time.monotonic()
    assert fast_code_reward(_fenced("def add(a, b):\n    while True:\n        pass"), TESTS) == 0.0
    assert time.monotonic() - start < 6.0
    result = run_python_tests("while True:\n    pass", "", timeout_s=0.5)
    assert result.timed_out and not result.passed


@needs_bwrap
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
    result = run_python_tests(code, TESTS, memory_mb=256, timeout_s=20.0)
    assert not result.timed_out and "MemoryError" in result.output


@needs_bwrap
def test_stdin_stdout_program_is_judged_by_the_parent(monkeypatch):
    monkeypatch.setattr(code_tests, "CODE_TIMEOUT_S", 20.0)
    reward = get_reward("code_io")
    cases = json.dumps([{"input": "1 2\n", "output": "3\n"}, {"input": "5 -5\n", "output": "0"}])
    honest = "a, b = map(int, input().split())\nprint(a + b)   "
    assert reward(_fenced(honest), cases) == 1.0
    assert reward(_fenced("print(3)"), cases) == 0.0
    assert reward(_fenced("import sys\nprint(0)\nsys.exit(1)"), cases) == 0.0
    run = run_python_program("while True:\n    pass", "", timeout_s=0.5)
    assert run.timed_out and run.returncode is None


def test_without_isolation_code_rewards_refuse_unless_opted_in(monkeypatch, caplog):
    monkeypatch.setattr(isolation, "bubblewrap_available", lambda: False)
    with pytest.raises(SandboxUnavailableError, match="rl.unsafe_code_execution"):
        run_python_tests("def add(a, b):\n    return a + b", TESTS)
    with pytest.raises(SandboxUnavailableError, match="rl.unsafe_code_execution"):
        run_python_tests("def add(a, b):\n    return a + b", TESTS, isolated=False)
    with pytest.raises(SandboxUnavailableError, match="required"):
        run_python_tests("", "", isolated=True)
    with unsafe_code_execution():
        assert run_python_tests("def add(a, b):\n    return a + b", TESTS).passed
    assert "unsafe_code_execution=true and bubblewrap is unusable" in caplog.text


def test_code_extraction():
    assert extract_code("```python\na = 1\n```\ntext\n```py\nb = 2\n```") == "b = 2\n"
    assert extract_code("```bash\nls\n```\n```\nc = 3\n```") == "c = 3\n"
    assert extract_code("<think>```python\nx = 0\n```</think>y = 1") == "y = 1"
