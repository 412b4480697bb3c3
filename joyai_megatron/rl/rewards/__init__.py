"""Verifiable rewards by name: `get_reward("math" | "code" | "think_format")(response, reference)`."""

from joyai_megatron.rl.rewards import code_tests, math_answer, think_format
from joyai_megatron.rl.rewards.registry import RewardFn, available_rewards, get_reward, register_reward

__all__ = [
    "RewardFn",
    "available_rewards",
    "code_tests",
    "get_reward",
    "math_answer",
    "register_reward",
    "think_format",
]
