"""Verifiable rewards by name: `get_reward("math" | "math_format" | "code" | "think_format")(response, reference)`."""

from joyai_megatron.rl.rewards import code_tests, math_answer, math_format, think_format
from joyai_megatron.rl.rewards.registry import RewardFn, available_rewards, get_reward, register_reward

__all__ = [
    "RewardFn",
    "available_rewards",
    "code_tests",
    "get_reward",
    "math_answer",
    "math_format",
    "register_reward",
    "think_format",
]
