"""Best-fit-decreasing bin packing of sequences into fixed-capacity rows.

Longest first, each into the open row whose free space is smallest but still enough: the
classic BFD heuristic, within 11/9 OPT + 6/9 rows, and in practice near-zero padding for SFT data
whose samples are much shorter than the row. Deterministic: ties keep input order.
"""

from __future__ import annotations

from bisect import bisect_left, insort


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Rows of indices into ``lengths``; each row's total length is at most ``capacity``."""
    if capacity <= 0:
        raise ValueError(f"capacity must be positive, got {capacity}")
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(f"sequence {too_long[0]} has {lengths[too_long[0]]} tokens > capacity {capacity}")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, row index), sorted
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        need = lengths[index]
        slot = bisect_left(free, (need, -1))
        if slot == len(free):
            rows.append([index])
            insort(free, (capacity - need, len(rows) - 1))
            continue
        space, row = free.pop(slot)
        rows[row].append(index)
        if space > need:
            insort(free, (space - need, row))
    return rows
