"""Deterministic sample order for post-training data: weighted blends, reshuffled every epoch.

SFT and DPO files are small next to a run (many epochs) and stored in an order that is not random
(best-fit packing puts the longest conversations first), so sample ``i`` of a run maps to a row
through a per-epoch seeded permutation.  The map depends only on ``i`` and the seed, which is what
makes resume exact and a global batch the same whatever the data-parallel size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class RowSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


def blend_assignments(weights: Sequence[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """``(source, k)`` per sample: sample ``i`` is the ``k``-th draw from ``source``.

    Greedy error minimisation (the rule Megatron's blended datasets use): each sample goes to the
    source furthest below its target share, so after ``n`` samples every source holds
    ``round(n * w)`` of them, give or take one.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"blend weights must be non-negative with a positive sum, got {list(weights)}")
    w = w / w.sum()
    if len(w) == 1:
        return np.zeros(num_samples, dtype=np.int64), np.arange(num_samples, dtype=np.int64)
    counts = np.zeros(len(w), dtype=np.int64)
    source = np.empty(num_samples, dtype=np.int64)
    draw = np.empty(num_samples, dtype=np.int64)
    for i in range(num_samples):
        s = int(np.argmax(w * (i + 1) - counts))
        source[i], draw[i] = s, counts[s]
        counts[s] += 1
    return source, draw


class ShuffledBlend:
    """Map-style view over one or more row sources: blended by weight, shuffled per epoch.

    ``length`` is the number of samples the run will draw (the trainer indexes modulo it).  With
    ``shuffle=False`` rows come in file order, which evaluation uses so every evaluation sees the
    same batches.
    """

    def __init__(
        self,
        sources: Sequence[RowSource],
        weights: Sequence[float],
        length: int,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        if len(sources) != len(weights):
            raise ValueError(f"{len(sources)} sources but {len(weights)} weights")
        for k, src in enumerate(sources):
            if len(src) == 0 and weights[k] > 0:
                raise ValueError(f"blend source {k} is empty but has weight {weights[k]}")
        self.sources = list(sources)
        self.length = max(int(length), 1)
        self.seed = seed
        self.shuffle = shuffle
        self._source, self._draw = blend_assignments(weights, self.length)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self.length

    def _permutation(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._perms:
            if len(self._perms) > 8:  # consecutive samples touch at most two epochs per source
                self._perms.clear()
            rng = np.random.default_rng([self.seed, source, epoch])
            self._perms[key] = rng.permutation(len(self.sources[source]))
        return self._perms[key]

    def locate(self, index: int) -> tuple[int, int]:
        """``(source, row)`` of sample ``index``."""
        s, k = int(self._source[index]), int(self._draw[index])
        n = len(self.sources[s])
        epoch, offset = divmod(k, n)
        row = int(self._permutation(s, epoch)[offset]) if self.shuffle else offset
        return s, row

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.length:
            raise IndexError(index)
        s, row = self.locate(index)
        return self.sources[s][row]
