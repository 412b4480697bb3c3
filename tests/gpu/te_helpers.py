"""What the te GPU tests share: DDP's gradient contract on a bare model, and a clean attention env."""

from __future__ import annotations

import pytest
import torch


def give_main_grads(model: torch.nn.Module) -> None:
    """What DDP gives each parameter: an fp32 ``main_grad`` the fused wgrad kernels add into."""
    for p in model.parameters():
        p.main_grad = torch.zeros_like(p, dtype=torch.float32)
        p.grad_added_to_main_grad = False
        p.grad = None


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every gradient by name, from ``main_grad`` where a fused kernel put it, else ``.grad``."""
    grads = {}
    for name, p in model.named_parameters():
        g = p.main_grad if p.grad_added_to_main_grad else p.grad
        if g is not None:
            grads[name] = g.detach().float()
    return grads


def fresh_backend_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each backend sets the NVTE_*_ATTN variables it wants when built (one per process in training)."""
    for var in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN"):
        monkeypatch.delenv(var, raising=False)
