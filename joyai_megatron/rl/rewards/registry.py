"""Name -> reward function registry, so recipes pick verifiers by name (`reward: math`).

A reward function takes the model's full response and the prompt's reference (answer, tests, or
unused) and returns a score in [0, 1]. `register_reward` enforces that contract on every call, so a
buggy custom verifier fails loudly instead of silently skewing advantages.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

RewardFn = Callable[[str, str], float]

_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering `fn(response, reference) -> float in [0, 1]` under `name`."""

    def decorate(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is already registered")

        @functools.wraps(fn)
        def checked(response: str, reference: str) -> float:
            score = float(fn(response, reference))
            if not 0.0 <= score <= 1.0:
                raise ValueError(f"reward {name!r} returned {score}, outside [0, 1]")
            return score

        _REGISTRY[name] = checked
        return checked

    return decorate


def get_reward(name: str) -> RewardFn:
    """The reward registered under `name`."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; registered: {sorted(_REGISTRY)}") from None


def available_rewards() -> list[str]:
    return sorted(_REGISTRY)
