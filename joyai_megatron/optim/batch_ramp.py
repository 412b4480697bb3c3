"""The global-batch ramp, expressed as Megatron-Core's step schedule.

Megatron-Core 0.19 ignores the old ``rampup_batch_size`` argument; batch growth is a step
schedule ``"THRESHOLD:BATCH ..."`` with thresholds in consumed tokens.  JoyAI's linear ramp
(~13M -> ~38M tokens per batch over the first ~100B tokens) becomes one step per increment.
"""

from __future__ import annotations


def ramp_thresholds(ramp: list[int] | None, global_batch: int) -> list[tuple[int, int]]:
    """``[start, increment, ramp_tokens]`` -> [(token threshold, global batch)], ending at global_batch."""
    if not ramp:
        return [(0, global_batch)]
    if len(ramp) != 3:
        raise ValueError(f"train.rampup_batch_size must be [start, increment, ramp_tokens], got {ramp}")
    start, increment, ramp_tokens = (int(x) for x in ramp)
    if start <= 0 or increment <= 0 or ramp_tokens <= 0 or start > global_batch:
        raise ValueError(f"train.rampup_batch_size {ramp} must be positive with start <= global_batch_size")
    steps = -(-(global_batch - start) // increment)
    if steps == 0:
        return [(0, global_batch)]
    schedule = []
    for k in range(steps + 1):
        schedule.append((ramp_tokens * k // steps, min(start + k * increment, global_batch)))
    return schedule


def schedule_string(thresholds: list[tuple[int, int]]) -> str:
    return " ".join(f"{tokens}:{batch}" for tokens, batch in thresholds)


def batch_size_at(consumed_samples: int, thresholds: list[tuple[int, int]], seq_length: int) -> int:
    """Same rule as Megatron-Core: the last entry whose threshold (in samples) has been reached."""
    size = thresholds[0][1]
    for tokens, batch in thresholds:
        if consumed_samples >= tokens // seq_length:
            size = batch
        else:
            break
    return size


def batch_sizes(total_iters: int, thresholds: list[tuple[int, int]], seq_length: int) -> list[int]:
    """Global batch of every step for ``total_iters`` steps from the start."""
    sizes, consumed = [], 0
    for _ in range(total_iters):
        size = batch_size_at(consumed, thresholds, seq_length)
        sizes.append(size)
        consumed += size
    return sizes
