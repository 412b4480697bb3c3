"""CPU and GPU give the same fp32 training losses for the tiny model (benchmarks/numerics.py).

Three steps: from the fourth, fp32 rounding differences reach the tiny model's near-tied MoE
routing and the trajectories separate by a few 1e-4 (docs/benchmarks.md, "Numerics")."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.joyai_helpers import REPO


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("experts", ["sequential", "grouped"])
def test_cpu_and_gpu_losses_agree(experts: str) -> None:
    cmd = [sys.executable, "benchmarks/numerics.py", "--compare", "--steps", "3", "--experts", experts]
    env = {**os.environ, "OMP_NUM_THREADS": "4"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(line[len("RESULT ") :])
    assert result["cpu"]["device"] == "cpu" and result["gpu"]["device"] != "cpu"
    assert len(result["cpu"]["lm_loss"]) == 3
    # both runs trained: the loss moved, and identically on both devices
    assert abs(result["cpu"]["lm_loss"][-1] - result["cpu"]["lm_loss"][0]) > 1e-2
    assert result["max_abs_diff"] <= 1e-4, result["abs_diff"]
