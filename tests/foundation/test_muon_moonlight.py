"""The recipes' Muon step is Moonlight's Muon applied to the Hugging Face model's matrices.

Moonlight (arXiv 2502.16982, ``MoonshotAI/Moonlight`` ``examples/toy_train.py``) runs Muon on every
2-D HF parameter except the embedding and the head: per matrix, Nesterov momentum, 5 Newton-Schulz
steps with (3.4445, -4.7750, 2.0315) on the Frobenius-normalised matrix (transposed when tall), the
update scaled by 0.2 * sqrt(max(rows, cols)), decoupled weight decay.  Here one real train step of
the tiny trainer is checked, parameter by parameter, against that update written out in float64 on
the parameter's HF tensors (the conversion mapping's split: a gated fc1 is ``gate_proj`` and
``up_proj``).  At the first step the momentum is a multiple of the gradient, which Newton-Schulz
normalises away, so the reference needs only the gradient the optimizer saw.
"""

from __future__ import annotations

import pytest
import torch

from joyai_megatron.config.schema import OptimCfg, ParallelCfg, PrecisionCfg
from joyai_megatron.convert.live import canonical_named_tensors
from joyai_megatron.convert.mapping import megatron_to_hf
from joyai_megatron.model.presets import recipe_arch
from joyai_megatron.optim.builder import _leaf_optimizers, optimizer_config
from joyai_megatron.optim.muon import GATED_FC1, BatchedMuon
from joyai_megatron.training.checkpoint import unwrap
from joyai_megatron.training.distributed import shutdown
from tests.foundation.foundation_helpers import tiny_trainer

MOONLIGHT_ABC = (3.4445, -4.7750, 2.0315)
# One of each kind of gated fc1 the tiny model has (canonical names).
FC1_KINDS = (
    "decoder.layers.0.mlp.linear_fc1.weight",  # the dense layer
    "decoder.layers.1.mlp.shared_experts.linear_fc1.weight",
    "decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight",
    "mtp.layers.0.mtp_model_layer.mlp.linear_fc1.weight",
)


def moonlight_update(matrix: torch.Tensor) -> torch.Tensor:
    """Moonlight's orthogonalised, scaled update of one matrix, in float64."""
    a, b, c = MOONLIGHT_ABC
    x = matrix.double()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    # Moonlight divides by norm + 1e-7, emerging-optimizers by max(norm, 1e-7): the same unless the
    # norm is within a few orders of 1e-7, which the tiny model's clipped gradients can be.
    x = x / x.norm().clamp_min(1e-7)
    for _ in range(5):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    x = x.T if tall else x
    return x * 0.2 * max(matrix.shape) ** 0.5


def step_and_capture(trainer) -> tuple[list[dict], BatchedMuon]:
    """Run one train step; for every Muon parameter record its value, gradient, LR and weight
    decay as the Muon step received them, and its value after the step."""
    [muon] = [
        leaf.optimizer
        for leaf in _leaf_optimizers(trainer.optimizer)
        if isinstance(leaf.optimizer, BatchedMuon)
    ]
    muon.fp32_matmul_prec = "highest"  # fp32 Newton-Schulz, so float64 is a tight reference
    seen: list[dict] = []
    inner_step = muon.step

    def recording_step(*args, **kwargs):
        for group in muon.param_groups:
            for p in group["params"]:
                seen.append(dict(param=p, before=p.detach().clone(), grad=p.grad.detach().clone(),
                                 lr=group["lr"], wd=group["weight_decay"]))  # fmt: skip
        return inner_step(*args, **kwargs)

    muon.step = recording_step
    trainer.train_step()
    return seen, muon


def canonical_names(trainer) -> dict[int, str]:
    """id of each model parameter and of its fp32 main copy -> canonical (HF-mappable) name."""
    names = {}
    for name, tensor in canonical_named_tensors(unwrap(trainer.model[0])):
        names[id(tensor)] = name
        if getattr(tensor, "main_param", None) is not None:
            names[id(tensor.main_param)] = name
    return names


@pytest.mark.parametrize(
    ("dtype", "split"),
    [("fp32", True), ("bf16", True), ("fp32", False)],
    ids=["fp32", "bf16-main-params", "fp32-fused-fc1"],
)
def test_muon_step_is_moonlights_on_the_hf_matrices(tmp_path, dtype: str, split: bool) -> None:
    overrides = [
        *(f"precision.dtype={dtype}", f"optim.muon_split_fc1={str(split).lower()}"),
        *("model.mtp_enabled=true", "scheduler.warmup_tokens=0"),  # a non-zero LR at step 1
    ]
    trainer = tiny_trainer(tmp_path, *overrides)
    try:
        arch = recipe_arch(trainer.recipe)
        names = canonical_names(trainer)
        seen, _ = step_and_capture(trainer)
        checked = set()
        for entry in seen:
            p, name = entry["param"], names[id(entry["param"])]
            assert entry["lr"] > 0 and entry["wd"] > 0, name
            assert getattr(p, GATED_FC1) == (split and name.endswith("linear_fc1.weight")), name
            parts = [t for _, t in megatron_to_hf(name, entry["grad"], arch)[: 2 if "fc1" in name else 1]]
            if not split:
                parts = [entry["grad"]]  # Megatron-Core's own treatment: the fused matrix
            update = torch.cat([moonlight_update(part) for part in parts])
            expected = entry["before"].double() * (1 - entry["lr"] * entry["wd"]) - entry["lr"] * update
            step = entry["before"].double() - expected
            got = entry["before"].double() - p.detach().double()
            torch.testing.assert_close(got, step, rtol=1e-4, atol=1e-4 * step.abs().max().item(), msg=name)
            checked.add(name)
        assert set(FC1_KINDS) <= checked
        assert {
            "decoder.layers.1.self_attention.linear_kv_up_proj.weight",
            "mtp.layers.0.eh_proj.weight",
        } <= checked
    finally:
        shutdown()


def test_split_and_fused_fc1_updates_differ() -> None:
    """The check above can tell the two treatments apart: on a random [gate; up] they differ."""
    grad = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    split = torch.cat([moonlight_update(half) for half in grad.chunk(2)])
    fused = moonlight_update(grad)
    assert (split - fused).norm() > 0.3 * fused.norm()


def test_unknown_coefficient_type_is_refused_naming_the_key() -> None:
    with pytest.raises(
        ValueError, match=r"optim\.muon_coefficient_type must be one of .*'simple'.*got 'moonlight'"
    ):
        optimizer_config(OptimCfg(muon_coefficient_type="moonlight"), ParallelCfg(), PrecisionCfg())


def test_split_fc1_is_refused_with_gtp_weight_rematerialisation() -> None:
    """GTP shards the TP-local [gate; up] by rows, so halves of a shard are not gate and up."""
    weight = torch.nn.Parameter(torch.randn(8, 4))
    setattr(weight, GATED_FC1, True)
    weight.is_gtp_weight_remat = True
    muon = BatchedMuon([weight], lr=0.1)
    with pytest.raises(ValueError, match=r"optim\.muon_split_fc1 with GTP weight re-materialisation"):
        muon.orthogonalize(weight, torch.randn(8, 4))
