"""Score many responses at once, so sandboxed verifiers do not serialise the rollout.

A code reward spends its time waiting on its sandbox's processes, not holding the interpreter
lock, so a thread pool runs ``workers`` verifications side by side (one per core by default:
each verification is itself a couple of short-lived Python processes).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from joyai_megatron.rl.rewards.registry import RewardFn


def default_workers() -> int:
    return len(os.sched_getaffinity(0))


def score_all(jobs: Sequence[tuple[RewardFn, str, str]], workers: int | None = None) -> list[float]:
    """``[fn(response, reference) for fn, response, reference in jobs]``, ``workers`` at a time."""
    workers = min(workers or default_workers(), len(jobs))
    if workers <= 1:
        return [fn(response, reference) for fn, response, reference in jobs]
    with ThreadPoolExecutor(workers, thread_name_prefix="reward") as pool:
        return list(pool.map(lambda job: job[0](job[1], job[2]), jobs))
