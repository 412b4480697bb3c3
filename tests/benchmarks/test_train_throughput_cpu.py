"""The throughput benchmark's CPU dry run: the same code path (our trainer core and the
transformers baseline, each in its own process, plus the profiler) on the tiny preset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.joyai_helpers import REPO


@pytest.mark.slow
def test_dry_run_prints_every_figure(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable,
        "benchmarks/train_throughput.py",
        "--dry-run",
        "--profile",
        "--out-dir",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    for figure in (
        "matmul peak",
        "tokens/s",
        "TFLOP/s",
        "MFU",
        "peak GiB",
        "ratio ours/baseline: tokens/s",
        "phases of one ours step",
        "profile of ours per step",
        "profile of baseline per step",
        "top ops by self device time",
        "top ops by self host time",
    ):
        assert figure in out, f"{figure!r} missing from:\n{out[-3000:]}"

    saved = json.loads((tmp_path / "results.json").read_text())
    parts = {r["part"]: r for r in saved["results"]}
    assert set(parts) == {"ours", "baseline"}
    for r in parts.values():
        assert "error" not in r, r
        steps = saved["args"]["steps"]
        tokens = steps * saved["args"]["global_batch"] * saved["args"]["seq_length"]
        # the printed rate is the tokens of the timed steps over their wall time
        assert abs(r["tokens_per_s"] - tokens / r["elapsed_s"]) < 1e-6 * r["tokens_per_s"]
        assert r["tflops"] == r["tokens_per_s"] * r["flops_per_token"] / 1e12
        assert len(r["losses"]) == saved["args"]["warmup"] + steps
        assert all(3.0 < loss < 12.0 for loss in r["losses"])  # ln(8192) = 9.01 at initialisation
        assert r["peak_mem_gib"] > 0 and len(r["profile"]["top"]) >= 3
        host = r["profile"]["host"]
        assert len(host) >= 3 and 0 < sum(row["share"] for row in host) <= 1.0 + 1e-6, host
    # MTP adds a layer and a second output head: more FLOPs per token than the baseline counts
    assert parts["ours"]["flops_per_token"] > parts["baseline"]["flops_per_token"]
