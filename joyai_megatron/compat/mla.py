"""MLA adaptations: replicated down projections without Transformer Engine; THD values unpadded.

**Unpadded THD values** (``te`` backend).  For packed (THD) batches Megatron-Core 0.19.2 pads MLA's
128-dim values with zeros to the 192-dim query/key width before core attention and trims the
output (``transformer/multi_latent_attention.py`` l.85-99, ``_prepare_mla_core_attention_value``),
a workaround from when Transformer Engine had no THD kernel for unequal head dims.  On an H200 with
TE 2.12 the padded call is what goes wrong: cuDNN fused attention returns the right output but
gradients 15-18% (dq, dk) and 9% (dv) off fp32 math, at any head count, input scale or document
split; the same call with the 128-dim values is exact (2.5e-3, bf16 rounding).  In the whole model
that was every ``te`` pretraining run's attention gradient (q projections 30% off, 12-14% in
step-1 gradient norms; tests/gpu/test_te_local_gradients_gpu.py, thd).  TE's core attention gets
the values unpadded; the ``local`` backend keeps upstream's padding (see
:func:`_value_for_core_attention`).

**Replicated down projections** (no TE).

With TE, Megatron-Core builds ``linear_q_down_proj``/``linear_kv_down_proj`` as ``TELinear``
(``parallel_mode="duplicated"``): every TP rank holds the whole matrix and, under sequence
parallelism, applies it to its own slice of the sequence; the shared rotary key ``k_pos_emb`` is
then all-gathered over the sequence, whose backward reduce-scatter sums the key gradients of
every rank's heads.

Without TE, Megatron-Core 0.19.2 has no replicated linear in scope and falls back to
``ColumnParallelLinear`` (``megatron/core/transformer/multi_latent_attention.py``, the
``HAVE_TE`` else-branch sets ``Linear = None``; ``_qkv_down_projection`` and
``get_query_key_value_tensors`` then take the ``gather_from_tensor_model_parallel_region``
path).  That path's backward only *splits* the gradient of ``kv_combined``: each rank keeps the
``k_pos_emb`` gradient of its own heads and the other ranks' contributions are lost, so under
TP > 1 the ``kv_down_proj`` gradient (and everything below it) is wrong.  Measured on the tiny
model at TP=2+SP vs one process: per-parameter gradients 5e-4 relative apart from fresh weights,
5-15% apart from trained ones.

The fix points the module's ``Linear`` name at Megatron-Core's own replicated linear
(``megatron.core.post_training.modelopt.layers.Linear``, here with TE's initialisation; it marks its weight
``sequence_parallel`` so ``finalize_model_grads`` all-reduces it over TP) and the local spec
uses it for both down projections, giving the TE code path.  Checkpoints are unchanged: the
weight is the same global tensor, replicated instead of split along TP.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.post_training.modelopt.layers import Linear
from megatron.core.transformer import multi_latent_attention


class ReplicatedLinear(Linear):
    """Megatron-Core's replicated ``Linear``, initialised with the config's ``init_method`` like
    ``TELinear`` (the parent keeps ``torch.nn.Linear``'s Kaiming default, 3.6x wider at hidden 64)."""

    def __init__(
        self, input_size: int, output_size: int, *, config: Any, init_method: Any, **kwargs: Any
    ) -> None:
        super().__init__(input_size, output_size, config=config, init_method=init_method, **kwargs)
        if config.perform_initialization:
            with torch.no_grad():
                init_method(self.weight)

    # As Megatron's parallel linears do: a class-level extra state puts ``_extra_state`` in the
    # state dict, the slot where ModelOpt stores each quantized module's quantizer metadata.
    def get_extra_state(self) -> None:
        """No state of its own (ModelOpt replaces this per module once it quantizes it)."""
        return None

    def set_extra_state(self, state: Any) -> None:
        """Nothing to restore (see ``get_extra_state``)."""


def install_replicated_down_projection() -> bool:
    """Bind :class:`ReplicatedLinear` where ``multi_latent_attention.py`` has ``Linear = None`` (TE
    missing), which makes its ``submodules.linear_q_down_proj in [Linear, TEColumnParallelLinear,
    ColumnParallelLinear]`` check reject any replicated linear; returns whether it changed."""
    if multi_latent_attention.Linear is not None:
        return False
    multi_latent_attention.Linear = ReplicatedLinear
    return True


def replicated_down_projection() -> type:
    """The class the ``local`` MLA spec uses for both down projections."""
    if multi_latent_attention.Linear is None:
        raise RuntimeError("MLA's replicated Linear is unset: call joyai_megatron.compat.install() first")
    return multi_latent_attention.Linear


UPSTREAM_VALUE_PREP = multi_latent_attention._prepare_mla_core_attention_value
_te_attention: type | None = None  # TE's core attention class, once install found TE


def _value_for_core_attention(
    parallel_attention: Any, query: torch.Tensor, value: torch.Tensor | None, packed_seq_params: Any
):
    """Upstream's signature and return ``(value, need_v_pad, orig_v_dim, padded_v_dim)``: TE's core
    attention takes the values as they are; any other keeps upstream's padding (the ``local``
    backend's SDPA: PyTorch's CPU flash kernel needs one head width for q, k and v, so unpadded
    values would fall back to the math kernel, which keeps every attention matrix for backward)."""
    if _te_attention is not None and isinstance(parallel_attention.core_attention, _te_attention):
        dim = value.shape[-1] if value is not None else None
        return value, False, dim, dim
    return UPSTREAM_VALUE_PREP(parallel_attention, query, value, packed_seq_params)


def install_unpadded_thd_value() -> bool:
    """Replace ``_prepare_mla_core_attention_value`` (both of its callers look it up in the module)
    where Transformer Engine imports; returns whether it changed."""
    global _te_attention
    if multi_latent_attention._prepare_mla_core_attention_value is _value_for_core_attention:
        return False
    try:
        from megatron.core.extensions import transformer_engine as te_extensions
    except RuntimeError:  # a TE import can raise this on a machine without CUDA
        return False
    if not te_extensions.HAVE_TE:  # the module then builds its classes on a MagicMock
        return False
    _te_attention = te_extensions.TEDotProductAttention
    multi_latent_attention._prepare_mla_core_attention_value = _value_for_core_attention
    return True
