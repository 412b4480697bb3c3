"""Parameter and FLOP counts: the spec's figures for the 48B model, and the analytic FLOP formula
against the count measured on the built (meta-device) model for every preset."""

from __future__ import annotations

import json

import pytest

from joyai_megatron.model.count import count_model, flops_per_token
from joyai_megatron.model.presets import JOYAI_48B_A3B, PRESETS
from joyai_megatron.training.distributed import init_distributed
from tests.joyai_helpers import run_cli


@pytest.fixture(scope="module")
def counts_48b() -> dict:
    """``python -m joyai_megatron count joyai_48b_a3b``, run once (meta device, ~10 s)."""
    proc = run_cli("count", "joyai_48b_a3b")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_48b_matches_the_spec(counts_48b: dict) -> None:
    assert counts_48b["total_params"] == pytest.approx(48.94e9, rel=2e-3)
    assert counts_48b["active_params"] == pytest.approx(3.30e9, rel=1e-2)
    assert counts_48b["active_params_no_embedding"] == pytest.approx(2.78e9, rel=1e-2)
    assert counts_48b["mtp_params"] == pytest.approx(79e6, rel=2e-2)
    # Untied embedding and head, each vocab x hidden.
    assert counts_48b["embedding_params"] == counts_48b["output_params"] == 129280 * 2048
    assert counts_48b["total_params_with_mtp"] == counts_48b["total_params"] + counts_48b["mtp_params"]
    assert counts_48b["seq_length"] == 4096


def test_48b_flops_analytic_equals_measured(counts_48b: dict) -> None:
    analytic = flops_per_token(JOYAI_48B_A3B, 4096, mtp=True)
    assert analytic == pytest.approx(counts_48b["flops_per_token"], rel=1e-9)


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "joyai_48b_a3b"])
@pytest.mark.parametrize("mtp", [True, False])
def test_flops_analytic_equals_measured(preset: str, mtp: bool, single_process: None) -> None:
    arch = PRESETS[preset]
    init_distributed()
    measured = count_model(arch, seq_length=512, mtp=mtp)
    assert flops_per_token(arch, 512, mtp=mtp) == pytest.approx(measured.flops_per_token, rel=1e-9)
    # Independent: 6 FLOPs per active matmul weight per token is the bulk of it (attention scores
    # add the rest), so the analytic count must exceed it and stay within the attention term.
    matmul_active = measured.active_params - measured.embedding_params
    if mtp:
        matmul_active += measured.mtp_params + measured.output_params * arch.mtp_num_layers
    assert measured.flops_per_token > 6 * matmul_active
