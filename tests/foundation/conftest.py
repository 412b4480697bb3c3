"""Fixtures shared by the foundation and pretraining tests (tests/pretrain/conftest.py re-exports
them; helpers live in foundation_helpers.py).

Everything runs on CPU in this process (gloo, one rank) except the few checks that must see a fresh
interpreter or the real command line; those go through ``foundation_helpers.run_cli``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def single_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A one-rank run in this process, torn down afterwards so the next test starts clean."""
    from joyai_megatron.training.distributed import shutdown

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    shutdown()
    yield
    shutdown()


@pytest.fixture
def fake_world(monkeypatch: pytest.MonkeyPatch):
    """Pretend to be rank 0 of ``n`` (torchrun's variables) without starting anything."""
    from joyai_megatron.training.distributed import shutdown

    shutdown()

    def set_world(n: int) -> None:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", str(n))
        monkeypatch.setenv("LOCAL_RANK", "0")

    yield set_world
    shutdown()
