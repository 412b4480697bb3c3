"""Fixtures shared by every test directory (helpers live in joyai_helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.joyai_helpers import DIST_VARS, write_mock_recipe


@pytest.fixture
def mock_recipe(tmp_path: Path):
    return lambda **sections: write_mock_recipe(tmp_path, **sections)


@pytest.fixture
def single_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A one-rank run in this process, torn down afterwards so the next test starts clean."""
    from joyai_megatron.training.distributed import shutdown

    for key in DIST_VARS:
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
