"""``math_format``: the math verifier plus partial credit for a well-formed numeric answer line.

For the tiny CPU demo: the demo's SFT model has only seen single-digit sums and word codes, so on
the RL word problems its greedy answers are essentially never right and a pure correctness reward
gives every group zero variance (no learning signal at all). A small credit for ending with
"Answer: <number>" gives the policy something to climb first; correctness (reward 1) dominates.
``pass@1`` in the logs counts only reward 1, i.e. correct answers.
"""

from __future__ import annotations

import re

from joyai_megatron.rl.rewards.math_answer import math_reward
from joyai_megatron.rl.rewards.registry import register_reward
from joyai_megatron.rl.rewards.think_format import strip_reasoning

FORMAT_CREDIT = 0.2
_ANSWER_LINE = re.compile(r"(?:^|\n)\s*Answer:\s*-?\d+(?:\.\d+)?\s*$")


@register_reward("math_format")
def math_format_reward(response: str, reference: str) -> float:
    """1.0 if the math verifier accepts the answer, FORMAT_CREDIT if the response (after any
    reasoning block) ends with an "Answer: <number>" line, else 0.0."""
    if math_reward(response, reference) == 1.0:
        return 1.0
    return FORMAT_CREDIT if _ANSWER_LINE.search(strip_reasoning(response)) else 0.0
