"""benchmarks/code_sandbox.py at toy size: both modes run, agree on every verdict, print the ratio."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from joyai_megatron.rl.rewards.sandbox import bubblewrap_available
from tests.joyai_helpers import REPO


@pytest.mark.skipif(not bubblewrap_available(), reason="no isolation mechanism: bubblewrap unusable here")
def test_benchmark_prints_both_modes_and_the_ratio() -> None:
    command = [sys.executable, "benchmarks/code_sandbox.py", "--programs", "8", "--rounds", "1"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "isolation on / off:" in proc.stdout
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["on"] > 0 and figures["off"] > 0 and figures["ratio"] == figures["on"] / figures["off"]
