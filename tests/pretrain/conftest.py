"""The pretraining tests share the foundation fixtures and helpers (tests/foundation/)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_FOUNDATION = Path(__file__).resolve().parents[1] / "foundation"
sys.path.insert(0, str(_FOUNDATION))  # foundation_helpers

_spec = importlib.util.spec_from_file_location("foundation_conftest", _FOUNDATION / "conftest.py")
_foundation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_foundation)

# pytest finds fixtures by name in this module.
single_process = _foundation.single_process
fake_world = _foundation.fake_world
