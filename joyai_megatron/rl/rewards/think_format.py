"""Format reward for thinking-mode responses: one `<think>...</think>` block, then the answer."""

from __future__ import annotations

import re

from joyai_megatron.rl.rewards.registry import register_reward

_THINK = re.compile(r"\s*<think>(?P<reasoning>.*?)</think>(?P<answer>.*)", re.DOTALL)


def strip_reasoning(response: str) -> str:
    """The part of a response after its last `</think>` (the whole response if there is none)."""
    return response.rsplit("</think>", 1)[-1]


@register_reward("think_format")
def think_format_reward(response: str, reference: str = "") -> float:
    """1.0 when the response opens with exactly one non-empty think block followed by a non-empty
    answer, else 0.0. `reference` is unused (the registry passes one to every reward)."""
    if response.count("<think>") != 1 or response.count("</think>") != 1:
        return 0.0
    match = _THINK.fullmatch(response)
    if match is None or not match["reasoning"].strip() or not match["answer"].strip():
        return 0.0
    return 1.0
