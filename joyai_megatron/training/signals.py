"""Save-and-exit on SIGTERM / SIGUSR1 (Slurm preemption, ``scancel --signal``).

The handler only records the signal; the train loop checks it after each step and all ranks agree
through one all-reduce, so every rank saves the same step and exits 0 together.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist


class ExitSignalHandler:
    def __init__(self, names: list[str]) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        for name in names:
            sig = getattr(signal, name, None)
            if not isinstance(sig, signal.Signals):
                raise ValueError(f"checkpoint.exit_signals: unknown signal {name!r}")
            self._previous[sig] = signal.signal(sig, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def should_exit(self) -> bool:
        """Collective: True on every rank once any rank received a signal."""
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32)
        if torch.cuda.is_available():
            flag = flag.cuda()  # gpu-only: NCCL reduces device tensors
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
