"""Code reward: the response's Python program must pass the prompt's reference tests, sandboxed."""

from __future__ import annotations

import re

from joyai_megatron.rl.rewards.registry import register_reward
from joyai_megatron.rl.rewards.sandbox import run_python_tests
from joyai_megatron.rl.rewards.think_format import strip_reasoning

_FENCE = re.compile(r"```[ \t]*(?P<lang>[\w+-]*)[ \t]*\n(?P<code>.*?)```", re.DOTALL)
_PYTHON_TAGS = {"", "python", "python3", "py"}
CODE_TIMEOUT_S = 10.0
CODE_MEMORY_MB = 1024


def extract_code(response: str) -> str:
    """The last fenced Python (or untagged) block of the answer; the answer itself if unfenced."""
    answer = strip_reasoning(response)
    blocks = [m["code"] for m in _FENCE.finditer(answer) if m["lang"].lower() in _PYTHON_TAGS]
    return blocks[-1] if blocks else answer


@register_reward("code")
def code_reward(response: str, reference: str) -> float:
    """1.0 if the extracted program passes `reference` (assert-style Python tests run after it in
    the same module) within CODE_TIMEOUT_S seconds and CODE_MEMORY_MB in the sandbox, else 0.0."""
    result = run_python_tests(
        extract_code(response), reference, timeout_s=CODE_TIMEOUT_S, memory_mb=CODE_MEMORY_MB
    )
    return 1.0 if result.passed else 0.0
