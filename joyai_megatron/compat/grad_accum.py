"""Gradient-accumulation fusion for Megatron-Core's linear layers without Apex.

With ``gradient_accumulation_fusion`` Megatron-Core's ``LinearWithGradAccumulationAndAsyncCommunication``
(tensor_parallel/layers.py l.678-687) computes each weight gradient straight into the fp32
``main_grad`` buffer of the DDP wrapper with Apex's ``fused_weight_gradient_mlp_cuda`` GEMMs;
without them (no Apex: a plain pip install, or our ``local`` backend) the weight gradient is first
materialised in bf16 and then added to ``main_grad`` by DDP's hook, once per parameter per
micro-batch: an extra read-modify-write of every gradient and ~900 small kernels per micro-batch
on the proxy model.  PyTorch (>= 2.8) exposes the same cuBLAS GEMM, bf16 inputs accumulated into an
fp32 output in place, as ``torch.addmm(..., out_dtype=torch.float32, out=main_grad)``: this module
provides Apex's two entry points on top of it and makes Megatron-Core see them (layers.py l.49-53
sets ``_grad_accum_fusion_available`` at import).  CUDA only, as Apex's kernels are.
"""

from __future__ import annotations

import types

import torch
from megatron.core.tensor_parallel import layers


def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """``main_grad += grad_output^T @ total_input`` (2-D inputs, fp32 ``main_grad``), in one GEMM."""
    if total_input.dtype == main_grad.dtype:
        torch.addmm(main_grad, grad_output.t(), total_input, out=main_grad)
    else:
        torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=main_grad.dtype, out=main_grad)


def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """The same for a bf16/fp16 ``main_grad`` (inputs of its dtype)."""
    torch.addmm(main_grad, grad_output.t(), total_input, out=main_grad)


def use_torch_wgrad_accumulation() -> bool:
    """Make Megatron-Core's linears use the functions above where Apex's extension is missing;
    returns whether fused weight-gradient accumulation is available afterwards (CUDA only)."""
    if layers._grad_accum_fusion_available:
        return True
    if not torch.cuda.is_available() or "dtype_out" not in torch.ops.aten.addmm.overloads():
        return False
    module = types.ModuleType("fused_weight_gradient_mlp_cuda")
    module.__doc__ = f"Apex's weight-gradient GEMMs on torch.addmm ({__name__})."
    module.wgrad_gemm_accum_fp32 = wgrad_gemm_accum_fp32
    module.wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp16
    layers.fused_weight_gradient_mlp_cuda = module
    layers._grad_accum_fusion_available = True
    return True


def wgrad_accumulation_available() -> bool:
    """Whether Megatron-Core's linears can fuse weight-gradient accumulation (Apex's extension, or
    the stand-in :func:`use_torch_wgrad_accumulation` installs with ``compat.install()``)."""
    return bool(layers._grad_accum_fusion_available)
