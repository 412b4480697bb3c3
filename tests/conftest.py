"""Fixtures shared by every test directory (helpers live in joyai_helpers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from joyai_helpers import write_mock_recipe  # noqa: E402


@pytest.fixture
def mock_recipe(tmp_path: Path):
    return lambda **sections: write_mock_recipe(tmp_path, **sections)
