"""The demo runs each ``python -m`` step in a forked child of a process that imported PyTorch and
Megatron-Core once: the child must behave as ``python -m module args`` does (its argv, exit codes,
exit handlers, a crash as a non-zero code) and leave the demo process untouched."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from joyai_megatron.demo import PY, STEPS, run_step

STEP_MODULE = """
import atexit, json, sys
from pathlib import Path
out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))
(out / "argv.json").write_text(json.dumps(sys.argv[1:]))
if sys.argv[2] == "crash":
    raise RuntimeError("step failed")
if sys.argv[2] != "ok":
    raise SystemExit(int(sys.argv[2]) if sys.argv[2].isdigit() else sys.argv[2])
"""


@pytest.fixture
def step_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "joyai_demo_step.py").write_text(STEP_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "joyai_demo_step"


@pytest.mark.parametrize(("outcome", "code"), [("ok", 0), ("3", 3), ("crash", 1), ("message", 1)])
def test_a_forked_step_runs_like_python_m(step_module: str, tmp_path: Path, outcome: str, code: int) -> None:
    assert run_step([*PY, step_module, str(tmp_path), outcome]) == code
    assert (tmp_path / "argv.json").read_text() == f'["{tmp_path}", "{outcome}"]'
    assert (tmp_path / "atexit").read_text() == "ran"  # exit handlers run, as at interpreter exit
    assert step_module not in sys.modules  # ran in the child, not imported here


def test_only_the_torchrun_step_starts_a_fresh_interpreter() -> None:
    fresh = [s.title for s in STEPS if s.argv[:2] != PY or s.argv[2] == "torch.distributed.run"]
    assert len(fresh) == 1 and "context parallelism" in fresh[0], fresh
