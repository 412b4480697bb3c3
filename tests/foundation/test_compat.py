"""The CPU redirects of Megatron-Core's hard-coded CUDA calls (joyai_megatron/compat/cpu.py)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

from joyai_megatron.compat import apply_cpu_redirects, redirect_cuda_device, redirect_sites
from joyai_megatron.compat.cpu import clip_grad_by_total_norm_cpu


def _lookup(module: str, path: str) -> object:
    owner: object = importlib.import_module(module)
    for part in path.split("."):
        owner = getattr(owner, part)
    return owner


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU redirects apply only without CUDA")
def test_every_site_resolves_and_is_wrapped() -> None:
    sites = redirect_sites()
    assert len(sites) >= 20
    # Resolve first: sites in optional packages (ModelOpt) are patched only once imported.
    for module, path, _ in sites:
        assert callable(_lookup(module, path)), f"{module}.{path}"
    assert apply_cpu_redirects() is True
    for module, path, lines in sites:
        target = _lookup(module, path)
        assert getattr(target, "__joyai_cpu_redirect__", False), f"{module}.{path} (l.{lines}) is not wrapped"
    # Applying twice does not wrap twice (the wrapper's wrapped function is the original).
    assert apply_cpu_redirects() is True
    for module, path, _ in sites:
        inner = getattr(_lookup(module, path), "__wrapped__", None)
        assert inner is not None and not getattr(inner, "__joyai_cpu_redirect__", False), path
    from megatron.core.optimizer import clip_grads, optimizer

    assert clip_grads.clip_grad_by_total_norm_fp32 is clip_grad_by_total_norm_cpu
    assert optimizer.clip_grad_by_total_norm_fp32 is clip_grad_by_total_norm_cpu


def _torch_entry_points() -> dict[str, object]:
    return {
        "current_device": torch.cuda.current_device,
        "current_stream": torch.cuda.current_stream,
        "synchronize": torch.cuda.synchronize,
        "Stream": torch.cuda.Stream,
        "stream": torch.cuda.stream,
        "Tensor.cuda": torch.Tensor.cuda,
        **{name: getattr(torch, name) for name in ("tensor", "zeros", "ones", "empty", "full", "arange")},
    }


def test_redirect_restores_torch_and_nested_keeps_outer_target() -> None:
    before = _torch_entry_points()
    with redirect_cuda_device("meta"):
        assert torch.cuda.current_device() == "meta"
        assert torch.zeros(3, device="cuda").device.type == "meta"
        with redirect_cuda_device("cpu"):  # an inner redirected site must not undo the outer one
            assert torch.cuda.current_device() == "meta"
            assert torch.ones(2, device=torch.device("cuda", 0)).device.type == "meta"
            assert torch.empty(2, device=0).device.type == "meta"
            assert torch.arange(4).cuda().device.type == "meta"
        assert torch.full((2,), 1.0, device="cuda").device.type == "meta"
        assert torch.zeros(2).device.type == "cpu"  # non-CUDA requests are left alone
        side = torch.cuda.Stream()  # the alltoall dispatcher's device-to-host stream
        assert side is torch.cuda.current_stream()
        with torch.cuda.stream(side):
            side.record_event().synchronize()
    after = _torch_entry_points()
    assert all(after[k] is before[k] for k in before), [k for k in before if after[k] is not before[k]]


def test_redirect_restores_after_an_exception() -> None:
    before = _torch_entry_points()
    with pytest.raises(KeyError), redirect_cuda_device("cpu"):
        assert torch.tensor([1.0], device="cuda").device.type == "cpu"
        raise KeyError("boom")
    after = _torch_entry_points()
    assert all(after[k] is before[k] for k in before)


def _grads(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = [
        torch.nn.Parameter(torch.randn(5, 3, generator=g)),
        torch.nn.Parameter(torch.randn(7, generator=g)),
    ]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 3
    return params


@pytest.mark.parametrize("max_norm", [0.5, 1.0, 1e6])
@pytest.mark.parametrize("norm_as_tensor", [False, True])
def test_clip_scales_like_torch(max_norm: float, norm_as_tensor: bool) -> None:
    ours, reference = _grads(0), _grads(0)
    total = torch.norm(torch.stack([p.grad.norm() for p in ours]))
    returned = torch.nn.utils.clip_grad_norm_(reference, max_norm)
    assert torch.allclose(returned, total)
    clip_grad_by_total_norm_cpu(ours, max_norm, total if norm_as_tensor else float(total))
    for a, b in zip(ours, reference, strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    if max_norm < float(total):
        assert torch.norm(torch.stack([p.grad.norm() for p in ours])) == pytest.approx(max_norm, rel=1e-5)


def test_clip_decoupled_grad() -> None:
    ours, reference = _grads(1), _grads(1)
    for p in ours:
        p.decoupled_grad, p.grad = p.grad, None
    total = float(torch.norm(torch.stack([p.decoupled_grad.norm() for p in ours])))
    clip_grad_by_total_norm_cpu(ours, 1.0, total, use_decoupled_grad=True)
    torch.nn.utils.clip_grad_norm_(reference, 1.0)
    for a, b in zip(ours, reference, strict=True):
        assert a.grad is None
        assert torch.allclose(a.decoupled_grad, b.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nothing_is_applied_on_a_cuda_machine_unless_forced() -> None:
    probe = (
        "import torch, importlib\n"
        "from joyai_megatron.compat import apply_cpu_redirects, redirect_sites\n"
        "assert apply_cpu_redirects() is False\n"
        "for module, path, _ in redirect_sites():\n"
        "    owner = importlib.import_module(module)\n"
        "    for part in path.split('.'):\n"
        "        owner = getattr(owner, part)\n"
        "    assert not getattr(owner, '__joyai_cpu_redirect__', False), path\n"
        "assert apply_cpu_redirects(force=True) is True\n"
    )
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_local_mla_down_projections_are_replicated(single_process) -> None:
    """Without TE, Megatron-Core would build MLA's down projections column-parallel, whose backward
    drops the other TP ranks' heads from the shared rotary key's gradient (compat/mla.py).  The
    local spec builds them replicated, weight marked for the TP all-reduce, initialised by the
    config's init_method (std 0.02), in the decoder and in the dense MTP layer."""
    from megatron.core.transformer import multi_latent_attention

    from joyai_megatron.compat.mla import ReplicatedLinear
    from joyai_megatron.model.presets import get_preset
    from joyai_megatron.training.checkpoint_model import build_megatron_model, init_single_process

    init_single_process()
    model = build_megatron_model(get_preset("tiny"), mtp=True)
    down = [
        (n, m) for n, m in model.named_modules() if n.endswith(("linear_q_down_proj", "linear_kv_down_proj"))
    ]
    assert len(down) == 2 * (get_preset("tiny").num_layers + 1)  # 3 decoder layers + the MTP layer
    assert multi_latent_attention.Linear is ReplicatedLinear
    for name, module in down:
        assert type(module) is ReplicatedLinear, name
        assert module.weight.sequence_parallel is model.config.sequence_parallel, name
        assert not getattr(module.weight, "tensor_model_parallel", False), name
        assert abs(float(module.weight.std()) - 0.02) < 0.004, (name, float(module.weight.std()))
