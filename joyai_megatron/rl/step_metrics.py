"""Per-step RL metrics: sums with counts (means) and maxima, reduced over all ranks at log time."""

from __future__ import annotations

import torch
import torch.distributed as dist


class StepMetrics:
    """Accumulate ``add(name, total, count)`` and ``peak(name, value)``; ``reduce()`` is collective.

    Every rank must call ``reduce`` with the same set of names: names are unioned first.
    """

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {}
        self.peaks: dict[str, float] = {}

    def add(self, name: str, total: float, count: float) -> None:
        entry = self.sums.setdefault(name, [0.0, 0.0])
        entry[0] += float(total)
        entry[1] += float(count)

    def peak(self, name: str, value: float) -> None:
        self.peaks[name] = max(self.peaks.get(name, float("-inf")), float(value))

    def reduce(self) -> dict[str, float]:
        names = [sorted(self.sums), sorted(self.peaks)]
        gathered: list[list[list[str]] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, names)
        sum_names = sorted({n for g in gathered for n in g[0]})  # type: ignore[index]
        peak_names = sorted({n for g in gathered for n in g[1]})  # type: ignore[index]
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        sums = torch.tensor([self.sums.get(n, [0.0, 0.0]) for n in sum_names], dtype=torch.float64).reshape(
            -1, 2
        )
        peaks = torch.tensor([self.peaks.get(n, float("-inf")) for n in peak_names], dtype=torch.float64)
        if device is not None:
            sums, peaks = sums.to(device), peaks.to(device)  # gpu-only
        dist.all_reduce(sums)
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        out = {n: float(sums[i, 0] / sums[i, 1]) for i, n in enumerate(sum_names) if sums[i, 1] > 0}
        out.update({n: float(peaks[i]) for i, n in enumerate(peak_names) if torch.isfinite(peaks[i])})
        self.sums.clear()
        self.peaks.clear()
        return out
