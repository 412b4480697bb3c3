"""Selective recompute without Transformer Engine (the ``local`` backend on CPU or a bare GPU).

``CheckpointWithoutOutput`` (tensor_parallel/random.py l.739-740) sets ``self.fp8 = fp8 is not None``,
so its default ``fp8=False`` reads as FP8-enabled, and its forward (l.692-696) and recompute
(l.788-791) then call TE's ``FP8GlobalStateManager``, ``activation_recompute_forward`` and
``fp8_autocast``, which random.py imports only when TE is installed (l.84-91). Every selective
recompute of ``layernorm``, ``moe_act`` or ``mla_up_proj`` (what the 48B recipes set) therefore dies
with ``NameError`` without TE. Without TE there is no FP8, so the stand-ins below answer exactly
what TE would with FP8 off: not enabled, no recipe, and contexts that do nothing.
"""

from __future__ import annotations

import contextlib
from typing import Any

from megatron.core.tensor_parallel import random as mcore_random


class FP8StateWithoutTE:
    """``FP8GlobalStateManager`` as TE answers it while FP8 is off."""

    @staticmethod
    def is_fp8_enabled() -> bool:
        return False

    @staticmethod
    def get_fp8_recipe() -> None:
        return None


def _no_op_context(*args: Any, **kwargs: Any) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


_STAND_INS = {
    "FP8GlobalStateManager": FP8StateWithoutTE,
    "activation_recompute_forward": _no_op_context,
    "fp8_autocast": _no_op_context,
}


def apply_no_te_fallbacks() -> list[str]:
    """Install the stand-ins where TE is not installed (idempotent); returns the names installed."""
    if mcore_random.HAVE_TE:  # random.py's own record of whether its TE import succeeded
        return []
    installed = []
    for name, stand_in in _STAND_INS.items():
        if getattr(mcore_random, name, None) is None:
            setattr(mcore_random, name, stand_in)
            installed.append(name)
    return installed
