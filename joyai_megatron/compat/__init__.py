"""The only place that adapts Megatron-Core (0.19.2) and its optional kernels to how this repository
runs them: on CPU, without Transformer Engine or Apex, with ZeRO-1 at FP32, under context parallelism;
and the CPU runtime under them (libgomp's thread teams, glibc's heap), which Megatron-Core's gloo
collectives and CPU training steps otherwise slow down.

Every patch is a row of :data:`PATCHES` (what it covers upstream, when it acts) and is installed by
:func:`install`, which ``training.distributed.init_distributed`` calls: every code path that builds a
Megatron-Core model, optimizer or checkpoint starts process groups there first.  Installing is
idempotent, and each installer changes nothing where its condition does not hold, so a GPU job with
TE and Apex runs upstream code everywhere except the rows marked *always* (each computes what
upstream computes, or what upstream means to compute where it is wrong).  Two adaptations are not
process-wide and are applied where they are used: the sync-free dispatcher (a class swap on the MoE
layers of each built model, ``model/build.py``) and :func:`~joyai_megatron.compat.target.assume_transformer_engine`
(a context for checking a GPU job's config on a machine without TE).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from joyai_megatron.compat.cpu import (
    apply_cpu_redirects,
    cuda_device_as_cpu,
    redirect_cuda_device,
    redirect_sites,
)


@dataclass(frozen=True)
class Patch:
    """One adaptation: its module here, the upstream code it covers, and when it is installed."""

    name: str
    module: str
    upstream: str
    when: str  # the installer checks it itself and changes nothing where it does not hold
    install: str  # function of ``module`` that installs it (idempotent)


PATCHES: tuple[Patch, ...] = (
    Patch(
        "cpu redirects",
        "cpu",
        "hard-coded CUDA devices, streams, RNG and type asserts (the sites in "
        "compat/cpu.py, each with its lines: RotaryEmbedding, router expert bias, alltoall streams, "
        "FP32Optimizer scale, grad clip, DistributedOptimizer)",
        "no CUDA",
        "apply_cpu_redirects",
    ),
    Patch(
        "serial helper threads",
        "threads",
        "not Megatron-Core: libgomp's spin throttling once gloo's worker threads run ATen copies in "
        "parallel (config/linux/wait.h do_spin; after every checkpoint save)",
        "no CUDA",
        "serial_helper_threads",
    ),
    Patch(
        "heap keeps freed memory",
        "allocator",
        "not Megatron-Core: glibc's dynamic mmap/trim thresholds (zero-fill page faults every step)",
        "no CUDA",
        "keep_freed_memory",
    ),
    Patch(
        "no-TE recompute",
        "no_te",
        "tensor_parallel/random.py l.84-91, 692-696, 739-740, 788-791 "
        "(FP8GlobalStateManager under selective recompute)",
        "no TE",
        "apply_no_te_fallbacks",
    ),
    Patch(
        "MLA down projections",
        "mla",
        "transformer/multi_latent_attention.py `Linear = None` without TE",
        "no TE",
        "install_replicated_down_projection",
    ),
    Patch(
        "MLA THD values unpadded for TE",
        "mla",
        "transformer/multi_latent_attention.py l.85-99 (zero-pads values to the q/k width in THD; "
        "TE 2.12's fused attention returns wrong gradients for that call)",
        "TE installed",
        "install_unpadded_thd_value",
    ),
    Patch(
        "multi-tensor ops",
        "multi_tensor",
        "optimizer/clip_grads.py and optimizer/optimizer.py local "
        "multi-tensor L2 norm and scale (host loops)",
        "no TE/Apex kernels",
        "apply_multi_tensor_fallbacks",
    ),
    Patch(
        "wgrad accumulation",
        "grad_accum",
        "tensor_parallel/layers.py l.49-53, 678-687 (Apex's fused_weight_gradient_mlp_cuda)",
        "CUDA without Apex",
        "use_torch_wgrad_accumulation",
    ),
    Patch(
        "ZeRO-1 gaps",
        "zero1",
        "optimizer/layer_wise_optimizer.py, distrib_optimizer.py (FP32 children, "
        "torch AdamW state, expert sharding at one dense rank; lines in compat/zero1.py)",
        "always",
        "use_zero1_fallbacks",
    ),
    Patch(
        "batched Muon",
        "muon",
        "optimizer/emerging_optimizers.py `_EMERGING_OPTIMIZERS['muon']`",
        "always",
        "use_batched_muon",
    ),
    Patch(
        "sync-free THD RoPE",
        "rope",
        "models/common/embeddings/rope_utils.py l.222-239 (unfused RoPE only)",
        "always",
        "use_sync_free_thd_rope",
    ),
    Patch(
        "padding-aware expert bias",
        "router",
        "transformer/moe/router.py l.727-739 (acts when a padding mask is passed: context parallelism)",
        "always",
        "use_padding_aware_expert_bias",
    ),
    Patch(
        "MTP loss under CP",
        "mtp",
        "transformer/multi_token_prediction.py l.757-880 (acts at CP > 1)",
        "always",
        "use_cp_exact_mtp_loss",
    ),
)


def install() -> None:
    """Install every patch whose condition holds in this process (idempotent); a later call also
    covers optional packages imported since (ModelOpt's CUDA sync, compat/cpu.py)."""
    for patch in PATCHES:
        getattr(importlib.import_module(f"{__name__}.{patch.module}"), patch.install)()


__all__ = [
    "PATCHES",
    "Patch",
    "apply_cpu_redirects",
    "cuda_device_as_cpu",
    "install",
    "redirect_cuda_device",
    "redirect_sites",
]
