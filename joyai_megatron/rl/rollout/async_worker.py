"""One rollout in flight on a background thread (the ``rl.async_rollout`` mode).

The engine holds its own copy of the weights, so generating rollout k+1 on this thread while the
trainer updates its model on rollout k needs no locking: the two share no tensors. The caller
waits for the result *before* syncing new weights into the engine, so a sync never races a
generation. PyTorch releases the GIL inside its kernels, which is where both threads spend their
time; the overlap is what ``benchmarks/rl_async.py`` measures.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class BackgroundTask:
    """Run ``fn()`` on a daemon thread; ``result()`` joins and re-raises its exception."""

    def __init__(self, fn: Callable[[], Any], name: str = "rollout") -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._value = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the caller in result()
            self._error = err

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise RuntimeError("background rollout failed") from self._error
        return self._value
