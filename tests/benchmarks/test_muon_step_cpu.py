"""benchmarks/muon_step.py at toy size on CPU: every variant steps and the report has the ratios."""

from __future__ import annotations

import json

from tests.joyai_helpers import load_benchmark


def test_dry_run_reports_each_variant_against_megatron(capsys) -> None:
    bench = load_benchmark("muon_step")
    results = bench.main(["--dry-run"])
    out = capsys.readouterr().out
    assert set(results) == {"megatron", "batched-fused", "ours"}
    assert "speed-up over megatron: megatron 1.00x" in out
    figures = json.loads(out.strip().splitlines()[-1])
    for name, result in results.items():
        assert result["matrices"] == 8  # 4 experts x (fc1, fc2)
        assert result["seconds"] > 0
        assert figures[name]["speedup"] == results["megatron"]["seconds"] / result["seconds"]
