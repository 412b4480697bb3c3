"""Code rewards: the response's Python program, run in the sandbox (rewards/sandbox), must pass the
prompt's reference tests (``code``) or print the expected output for each given stdin (``code_io``).
"""

from __future__ import annotations

import json
import re

from joyai_megatron.rl.rewards.registry import register_reward
from joyai_megatron.rl.rewards.sandbox import run_python_program, run_python_tests
from joyai_megatron.rl.rewards.think_format import strip_reasoning

_FENCE = re.compile(r"```[ \t]*(?P<lang>[\w+-]*)[ \t]*\n(?P<code>.*?)```", re.DOTALL)
_PYTHON_TAGS = {"", "python", "python3", "py"}
CODE_TIMEOUT_S = 10.0
CODE_MEMORY_MB = 1024
CODE_REWARDS = ("code", "code_io")


def extract_code(response: str) -> str:
    """The last fenced Python (or untagged) block of the answer; the answer itself if unfenced."""
    answer = strip_reasoning(response)
    blocks = [m["code"] for m in _FENCE.finditer(answer) if m["lang"].lower() in _PYTHON_TAGS]
    return blocks[-1] if blocks else answer


@register_reward("code")
def code_reward(response: str, reference: str) -> float:
    """1.0 if the judge runs every line of ``reference`` (assert-style Python using the program's
    top-level names) without an exception, within CODE_TIMEOUT_S seconds and CODE_MEMORY_MB."""
    result = run_python_tests(
        extract_code(response), reference, timeout_s=CODE_TIMEOUT_S, memory_mb=CODE_MEMORY_MB
    )
    return 1.0 if result.passed else 0.0


def _normalise(text: str) -> list[str]:
    """Output lines without trailing spaces or trailing blank lines (the usual judge tolerance)."""
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


@register_reward("code_io")
def code_io_reward(response: str, reference: str) -> float:
    """1.0 if the program exits 0 and prints the expected output for every case of ``reference``, a
    JSON list of {"input": stdin, "output": expected stdout}; the comparison happens here, outside
    the program's reach."""
    program = extract_code(response)
    for case in json.loads(reference):
        run = run_python_program(program, case["input"], timeout_s=CODE_TIMEOUT_S, memory_mb=CODE_MEMORY_MB)
        if run.returncode != 0 or _normalise(run.stdout) != _normalise(case["output"]):
            return 0.0
    return 1.0
