"""Routed experts for the ``local`` backend as two grouped GEMMs (``torch.nn.functional.grouped_mm``).

Megatron-Core's ``SequentialMLP`` runs one small MLP per expert: with 64-256 experts a layer
launches thousands of kernels and the GPU waits on Python.  This subclass keeps its parameters
(``local_experts.E.linear_fc{1,2}.weight``, so checkpoints, conversion and Muon's per-matrix
orthogonalisation are unchanged) and computes all experts at once: the per-expert weights are
stacked (one copy per layer per micro-batch, or per forward-backward pass inside
:func:`frozen_expert_weights`) and multiplied with PyTorch's grouped GEMM, whose group offsets are
the cumulative token counts the dispatcher already produced.  Selected by
``model.moe_grouped_gemm=true`` with ``model.backend=local``, and on the ``te`` backend with
``model.moe_grouped_gemm_impl=torch`` (where, under FP8, the experts stay BF16).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
from megatron.core.transformer.moe.experts import SequentialMLP

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_available() -> bool:
    return _GROUPED_MM is not None


# Stacked [E, out, in] expert weights by the identity of their parameters, while
# ``frozen_expert_weights`` is active; None outside it.
_STACKS: dict[tuple[int, ...], torch.Tensor] | None = None


@contextlib.contextmanager
def frozen_expert_weights() -> Iterator[None]:
    """Within this block the caller promises the parameters do not change (one forward-backward
    pass over a step's micro-batches: the optimizer steps after it).  Each layer then stacks its
    experts' weights once instead of once per micro-batch (a full read and write of the layer's
    expert weights each time).  Peak memory is unchanged or lower: every in-flight micro-batch
    already saved a stack for its backward, now they share one.  Dropped on exit; a nested block
    shares the outer one's stacks."""
    global _STACKS
    if _STACKS is not None:
        yield
        return
    _STACKS = {}
    try:
        yield
    finally:
        _STACKS = None


def stacked_weights(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` of the detached weights, shared within :func:`frozen_expert_weights`."""
    key = tuple(map(id, weights))
    stack = _STACKS.get(key) if _STACKS is not None else None
    if stack is None:
        stack = torch.stack([w.detach() for w in weights])
        if _STACKS is not None:
            _STACKS[key] = stack
    return stack


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient dense: the grouped GEMM's backward
    rejects broadcast (zero-stride) gradients, such as the one ``out.sum()`` produces."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class _GroupedLinear(torch.autograd.Function):
    """``y[rows of g] = x[rows of g] @ W_g^T`` for all experts g in two grouped GEMMs.

    The weight gradient is one grouped GEMM over all experts; under Megatron's DDP (parameters
    with ``main_grad``) it is added to the fp32 main-grad buffers in one multi-tensor add and the
    parameters are marked ``grad_added_to_main_grad``, as Megatron's fused-wgrad linears do, instead
    of DDP's hook adding each expert's bf16 gradient separately (2 x experts kernels per layer per
    micro-batch).  Without ``main_grad`` the per-expert gradients are returned as autograd's.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, offs: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        w = stacked_weights(weights)  # [E, out, in]
        ctx.save_for_backward(x, offs, w)
        ctx.weights = weights
        return _GROUPED_MM(x, w.transpose(1, 2), offs=offs)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, offs, w = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = _GROUPED_MM(grad, w, offs=offs) if ctx.needs_input_grad[0] else None
        grad_w = _GROUPED_MM(grad.t(), x, offs=offs).unbind(0)  # E x [out, in]
        weights = ctx.weights
        if all(getattr(wt, "main_grad", None) is not None for wt in weights):
            torch._foreach_add_([wt.main_grad for wt in weights], list(grad_w))
            for wt in weights:
                wt.grad_added_to_main_grad = True
        # With main_grad the returned gradients are DDP's hook's placeholders (it skips the add).
        return grad_x, None, *grad_w


class GroupedMMExperts(SequentialMLP):
    """``SequentialMLP`` with the same weights and maths, computed by grouped GEMMs.

    Falls back to the per-expert loop where the grouped form does not apply: expert tensor
    parallelism (fc2 would need its reduction), linear biases, FP8/FP4 token padding, TE activation
    modules, probabilities applied on the input, or a PyTorch without grouped GEMM.
    """

    def _grouped_applies(self) -> bool:
        c = self.config
        return (
            grouped_mm_available()
            and self.num_local_experts > 1
            and self.tp_group.size() == 1
            and not c.add_bias_linear
            and not c.moe_router_padding_for_quantization
            and not c.use_te_activation_func
            and not c.moe_apply_probs_on_input
            and not (c.bias_activation_fusion and not self._fused_swiglu())
        )

    def forward(
        self,
        permuted_local_hidden_states: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        permuted_probs: torch.Tensor,
    ) -> tuple[torch.Tensor, None]:
        if not self._grouped_applies():
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        x = permuted_local_hidden_states
        # Group g holds rows [offs[g-1], offs[g]); the dispatcher sorted tokens by expert.
        offs = torch.cumsum(
            tokens_per_expert.to(device=x.device, dtype=torch.int32), dim=0, dtype=torch.int32
        )
        self._run_expert_pre_hooks()
        w1 = [e.linear_fc1.weight for e in self.local_experts]  # E x [2F or F, H]
        w2 = [e.linear_fc2.weight for e in self.local_experts]  # E x [H, F]
        h = _GroupedLinear.apply(x.to(w1[0].dtype), offs, *w1)
        if self.config.bias_activation_fusion:
            # Megatron-Core's fused SwiGLU with the routing weight, as TEGroupedMLP calls it.
            h = weighted_bias_swiglu_impl(h, None, permuted_probs.unsqueeze(-1)).to(w2[0].dtype)
        else:
            # As MLP.forward does for experts: scale by the routing probability in its (fp32) dtype.
            h = (self._activation(h) * permuted_probs.unsqueeze(-1)).to(w2[0].dtype)
        out = _GroupedLinear.apply(h, offs, *w2)
        return _ContiguousGrad.apply(out.to(x.dtype)), None

    def _run_expert_pre_hooks(self) -> None:
        """Run the forward pre-hooks of the expert linears this forward bypasses: with
        ``overlap_param_gather`` Megatron's DDP waits there for each parameter's all-gather
        (distributed_data_parallel.py ``_make_forward_pre_hook``, registered per module, own
        parameters only), so without this the stack could read weights still being gathered."""
        for expert in self.local_experts:
            for linear in (expert.linear_fc1, expert.linear_fc2):
                for hook in linear._forward_pre_hooks.values():
                    hook(linear, ())

    def _fused_swiglu(self) -> bool:
        """Whether Megatron-Core's fused kernel computes this activation (plain SwiGLU)."""
        c = self.config
        return (
            c.gated_linear_unit
            and c.activation_func is F.silu
            and c.activation_func_clamp_value is None
            and c.glu_linear_offset == 0.0
        )

    def _activation(self, h: torch.Tensor) -> torch.Tensor:
        """MLP.forward's unfused activation (GLU with its optional clamp and linear offset)."""
        c = self.config
        if not c.gated_linear_unit:
            return c.activation_func(h)
        x_glu, x_linear = torch.chunk(h, 2, dim=-1)
        if (val := c.activation_func_clamp_value) is not None:
            x_glu = x_glu.clamp(min=None, max=val)
            x_linear = x_linear.clamp(min=-val, max=val)
        return c.activation_func(x_glu) * (x_linear + c.glu_linear_offset)
