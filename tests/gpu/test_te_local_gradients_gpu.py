"""The ``te`` model's forward activations and gradients equal the ``local`` model's, tensor by tensor,
from the same weights (skipped without CUDA/TE).

``local``'s gradients equal transformers' DeepseekV3 (tests/convert/test_logits.py), so this is the
check that the production backend computes the same network. The proxy's real widths, two layers
(dense + MoE), no MTP; the attention inputs (q, k, v) are captured too, so a difference is located
to the block that introduces it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tests.joyai_helpers import relative_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        importlib.util.find_spec("transformer_engine") is None, reason="needs Transformer Engine"
    ),
]


def _te_name(local_name: str, dense_layers: set[int]) -> str:
    """The te model's name of a local parameter: TE fuses some norms into the next linear
    (the same maps that give both backends one checkpoint format, model/spec.py)."""
    from joyai_megatron.model.spec import TE_DENSE_NORM_NAMES, TE_NORM_NAMES

    names = dict(TE_NORM_NAMES)
    if any(f"layers.{i}." in local_name for i in dense_layers):
        names.update(TE_DENSE_NORM_NAMES)
    for old, new in names.items():
        local_name = local_name.replace(old, new)
    return local_name


def _run(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
    """LM loss backward (gradient-accumulation fusion as in training); returns logits, {layer: (q, k, v)} at core attention, {name: grad}."""
    captured: dict[int, tuple] = {}
    hooks = [
        layer.self_attention.core_attention.register_forward_pre_hook(
            lambda _m, args, i=i: captured.__setitem__(i, tuple(a.detach().float() for a in args[:3]))
        )
        for i, layer in enumerate(model.decoder.layers)
    ]
    for p in model.parameters():  # what DDP gives each parameter: fused wgrad kernels add into it
        p.main_grad = torch.zeros_like(p, dtype=torch.float32)
        p.grad_added_to_main_grad = False
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    logits = model(ids, positions, None)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    for h in hooks:
        h.remove()
    grads = {}
    for name, p in model.named_parameters():
        g = p.main_grad if p.grad_added_to_main_grad else p.grad
        if g is not None:
            grads[name] = g.detach().float()
    return logits.detach().float(), captured, grads


@pytest.mark.parametrize("dtype,tol", [("fp32", 2e-3), ("bf16", 3e-2)])
def test_te_model_matches_local_per_tensor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str, tol: float
) -> None:
    from megatron.core import dist_checkpointing

    from joyai_megatron.model.presets import get_preset
    from joyai_megatron.training.checkpoint import load_model_weights, model_sharded_state_dict
    from joyai_megatron.training.checkpoint_model import build_megatron_model, init_single_process

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    init_single_process()
    arch = get_preset("joyai_proxy_1gpu").replace(num_layers=2, mtp_num_layers=0)
    local = build_megatron_model(arch, backend="local", dtype=dtype, mtp=False)
    dist_checkpointing.save(model_sharded_state_dict([local]), str(tmp_path))
    # Each backend sets the NVTE_*_ATTN variables it wants when built (one per process in training).
    for var in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN"):
        monkeypatch.delenv(var, raising=False)
    te = build_megatron_model(arch, backend="te", dtype=dtype, mtp=False, seed=99)
    load_model_weights(te, tmp_path)

    ids = torch.randint(0, arch.vocab_size, (2, 512), generator=torch.Generator().manual_seed(0)).cuda()
    local_logits, local_qkv, local_grads = _run(local, ids)
    te_logits, te_qkv, te_grads = _run(te, ids)

    report = {"logits": relative_error(te_logits, local_logits)}
    for i, tensors in local_qkv.items():
        for name, a, b in zip("qkv", te_qkv[i], tensors, strict=True):
            report[f"layer{i}.{name}"] = relative_error(a, b)
    dense = {i for i, moe in enumerate(arch.moe_layer_freq) if not moe}
    missing = []
    for name, g in local_grads.items():
        other = te_grads.get(_te_name(name, dense))
        if other is None:
            missing.append(name)
            continue
        report[f"grad {name}"] = relative_error(other, g)
    print(f"{dtype}: " + ", ".join(f"{k} {v:.2e}" for k, v in report.items()))
    assert not missing, f"te has no tensor named like {missing}"
    bad = {k: v for k, v in report.items() if v > tol}
    assert not bad, f"{dtype}: te differs from local by more than {tol}: {bad}"
