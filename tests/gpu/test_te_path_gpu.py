"""The production GPU path on one GPU with Transformer Engine (skipped without CUDA or TE).

* every shipped 48B recipe trains a few steps through ``python -m joyai_megatron smoke`` (te backend,
  its FP8 recipe, recompute, distributed optimizer, FP8 parameter gather, async checkpoints; depth,
  layout, batch and data cut to one GPU: ``joyai_megatron/smoke.py``);
* ``te`` and ``local`` train the same proxy model from the same step-0 checkpoint to within bf16
  tolerance, and each FP8 recipe ends within 1% of BF16 (``benchmarks/backend_equivalence.py``).

Measured figures and the commands: docs/benchmarks.md ("The te backend and FP8").
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.joyai_helpers import REPO

GPU_RECIPES = sorted(
    str(p.relative_to(REPO))
    for p in (REPO / "recipes").rglob("*.yaml")
    if "joyai_48b_a3b" in str(p) and p.name != "base.yaml"
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        importlib.util.find_spec("transformer_engine") is None, reason="needs Transformer Engine"
    ),
]


def _run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    return proc


def test_every_shipped_gpu_recipe_trains_on_one_gpu(tmp_path: Path) -> None:
    assert len(GPU_RECIPES) == 9, GPU_RECIPES  # pretraining stages 1-4 (64K, 128K), SFT, DPO, RL, QAT
    _run(
        [
            sys.executable,
            "-m",
            "joyai_megatron",
            "smoke",
            *GPU_RECIPES,
            "--work",
            str(tmp_path),
            "--jobs",
            "3",
        ],
        1800,
    )
    results = json.loads((tmp_path / "smoke.json").read_text())
    assert [r["recipe"] for r in results] == GPU_RECIPES
    for r in results:
        assert r["ok"] and r["steps"] == 3, r


def test_te_matches_local_and_fp8_matches_bf16(tmp_path: Path) -> None:
    from data_prep.demo import build_demo

    build_demo(tmp_path / "data", progress=False)
    _run(
        [sys.executable, "benchmarks/backend_equivalence.py", "--data", str(tmp_path / "data"),
         "--out-dir", str(tmp_path / "bf16"), "--steps", "20", "--concurrent", "2"],
        1800,
    )  # fmt: skip
    _run(
        [sys.executable, "benchmarks/backend_equivalence.py", "--data", str(tmp_path / "data"),
         "--out-dir", str(tmp_path / "fp8"), "--steps", "200", "--layers", "3", "--concurrent", "4",
         "--parts", "te-bf16,te-fp8-blockwise,te-fp8-tensorwise,te-fp8-delayed"],
        3600,
    )  # fmt: skip
