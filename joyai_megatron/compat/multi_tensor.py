"""Multi-tensor kernels for GPUs without Transformer Engine or Apex (the ``local`` backend).

Without either, Megatron-Core 0.19 falls back to ``megatron.core.utils.local_multi_tensor_l2_norm``
and ``local_multi_tensor_scale``: the first turns every gradient's norm into a Python float (one
host-device sync per parameter, ~1000 per step for the proxy model) and the second launches two
kernels and an allocation per tensor. These replacements compute the same results with PyTorch's
``_foreach`` kernels (a few launches per list, no sync). They replace only those fallbacks; with TE
or Apex present nothing changes.
"""

from __future__ import annotations

import importlib

import torch
from megatron.core import utils as mcore_utils

# (module, attribute, Megatron's fallback it may hold, replacement name). Megatron-Core 0.19.2:
# clip_grads.py l.45-46 and optimizer.py l.38 bind the fallbacks at import time.
_SITES = (
    ("megatron.core.optimizer.clip_grads", "l2_norm_impl", "local_multi_tensor_l2_norm", "foreach_l2_norm"),
    (
        "megatron.core.optimizer.clip_grads",
        "multi_tensor_scale_impl",
        "local_multi_tensor_scale",
        "foreach_scale",
    ),
    (
        "megatron.core.optimizer.optimizer",
        "multi_tensor_scale_impl",
        "local_multi_tensor_scale",
        "foreach_scale",
    ),
)


def foreach_l2_norm(
    chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list[list[torch.Tensor]], per_tensor: bool, *args
) -> tuple[torch.Tensor, None]:
    """L2 norm over all tensors of all lists, as a 1-element fp32 tensor on their device."""
    del chunk_size, noop_flag, per_tensor, args
    norms = [n.float() for tensors in tensor_lists if tensors for n in torch._foreach_norm(tensors)]
    if not norms:
        return torch.zeros(1, dtype=torch.float), None
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def foreach_scale(
    chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list[list[torch.Tensor]], scale: float
) -> None:
    """``dst = src * scale`` for each pair (casting to dst's dtype), with no per-tensor launches."""
    del chunk_size, noop_flag
    src, dst = tensor_lists
    if not dst:
        return
    if all(s is d for s, d in zip(src, dst, strict=True)):
        torch._foreach_mul_(dst, scale)
    elif scale == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        for s, d in zip(src, dst, strict=True):  # rare: scaled copy, no shared temporary
            d.copy_(s * scale)


def apply_multi_tensor_fallbacks() -> list[str]:
    """Install the replacements where Megatron bound its local fallbacks; returns what changed."""
    changed = []
    for module_name, attr, fallback, replacement in _SITES:
        module = importlib.import_module(module_name)
        if getattr(module, attr, None) is getattr(mcore_utils, fallback):
            setattr(module, attr, globals()[replacement])
            changed.append(f"{module_name}.{attr}")
    return changed
