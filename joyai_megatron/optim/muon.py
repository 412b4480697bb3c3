"""Muon with one batched Newton-Schulz per matrix shape.

Megatron-Core's ``TensorParallelMuon`` orthogonalises one matrix at a time: ~30 kernel launches per
parameter, and an MoE model has hundreds of same-shaped expert matrices (64 experts x 2 per layer
in the 1-GPU proxy; 256 in JoyAI), so the optimizer step is bound by the host launching kernels,
not by the GPU. ``BatchedMuon`` runs the same per-matrix update (weight decay, momentum, Nesterov,
Newton-Schulz on each matrix, spectral scale) with the Newton-Schulz of same-shaped matrices
stacked into batched matmuls. Parameters whose orthogonalisation needs more than their own local
matrix (QKV splitting, non-blockwise tensor parallelism, GTP re-materialisation) keep the
per-matrix path. Optimizer state (``momentum_buffer`` per parameter) is unchanged, so checkpoints
are interchangeable with ``TensorParallelMuon``.

A gated MLP's ``linear_fc1`` holds two matrices, ``[gate; up]`` (the HF checkpoint's ``gate_proj``
and ``up_proj``).  Megatron-Core 0.19 orthogonalises the fused matrix as one (NVIDIA/Megatron-LM
#6688 and #7077 are open about it); Moonlight's Muon, which the recipes follow, works on the HF
parameters, so gate and up are orthogonalised and scaled each on its own.  Parameters tagged
``is_gated_fc1`` (``optim/builder.py`` tags them when ``optim.muon_split_fc1`` is on) take that
path in both the batched and the per-matrix step; for a routed expert it also cuts the
Newton-Schulz work on fc1 by ~2.3x (two 768-row matrices instead of one of 1536 rows).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from emerging_optimizers import utils as eo_utils
from emerging_optimizers.orthogonalized_optimizers import get_muon_scale_factor
from emerging_optimizers.orthogonalized_optimizers.muon_utils import newton_schulz
from megatron.core.optimizer import emerging_optimizers as mcore_eo
from megatron.core.utils import get_pg_size

# Matrices stacked per batched Newton-Schulz, by element count (fp32: 1 GiB), bounding the
# temporary memory of the stack and its bf16 iterates.
MAX_BATCH_ELEMENTS = 2**28

# Parameter attribute: a gated MLP's fused [gate; up] fc1 weight, orthogonalised as two matrices.
GATED_FC1 = "is_gated_fc1"


class BatchedMuon(mcore_eo.TensorParallelMuon):
    """``TensorParallelMuon`` whose step batches the Newton-Schulz of same-shaped matrices."""

    def __init__(
        self,
        params: Any,
        *args: Any,
        num_ns_steps: int = 5,
        coefficient_type: str = "quintic",
        scale_mode: str = "spectral",
        extra_scale_factor: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            *args,
            num_ns_steps=num_ns_steps,
            coefficient_type=coefficient_type,
            scale_mode=scale_mode,
            extra_scale_factor=extra_scale_factor,
            **kwargs,
        )
        self.num_ns_steps = num_ns_steps
        self.coefficient_type = coefficient_type
        self.scale_mode = scale_mode
        self.extra_scale_factor = extra_scale_factor

    def orthogonalize(self, p: torch.Tensor, grad: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The parent's orthogonalisation, gate and up halves apart for a gated fc1.

        With TP each rank holds ``[gate_r; up_r]`` (Megatron's stride-2 fc1 layout), so each half
        all-gathers across TP into the full gate or up matrix in the parent's duplicated mode."""
        if not getattr(p, GATED_FC1, False):
            return super().orthogonalize(p, grad, **kwargs)
        if getattr(p, "is_gtp_weight_remat", False):
            raise ValueError(
                "optim.muon_split_fc1 with GTP weight re-materialisation: the gathered shards would "
                "interleave gate and up rows; set optim.muon_split_fc1=false"
            )
        return torch.cat([super().orthogonalize(p, half, **kwargs) for half in grad.chunk(2, dim=0)])

    def _batchable(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s update depends on its local matrix alone (what the batch computes)."""
        if p.ndim != 2 or (self.split_qkv and self.is_qkv_fn(p)):
            return False
        partition_dim = getattr(p, "partition_dim", None)
        if self.tp_mode != "blockwise" and partition_dim not in (None, -1) and self._tp_size(p) > 1:
            return False  # the full matrix spans TP ranks: the parent gathers it
        if self.pg_collection is not None and getattr(p, "is_gtp_weight_remat", False):
            name = "expt_gtp_remat" if getattr(p, "expert_tp", False) else "gtp_remat"
            group = getattr(self.pg_collection, name, None)
            if group is not None and get_pg_size(group) > 1:
                return False
        return True

    def _tp_size(self, p: torch.Tensor) -> int:
        """Size of the TP group ``orthogonalize`` would use for ``p`` (TP-parallel linears carry a
        ``partition_dim`` at every TP size; with one rank their local matrix is the whole one)."""
        if not self.pg_collection:
            return 2  # unknown group: leave the parameter to the parent
        group = self.pg_collection.expt_tp if getattr(p, "expert_tp", False) else self.pg_collection.tp
        return get_pg_size(group)

    def _momentum(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """Weight decay, momentum EMA and Nesterov look-ahead, as the parent step does them."""
        grad = p.grad
        self._apply_weight_decay_inplace(p, grad, group["lr"], group["weight_decay"])
        buf = self.state[p]["momentum_buffer"]
        buf.lerp_(grad, 1 - group["momentum"])
        return grad.lerp(buf, group["momentum"]) if self.nesterov else buf

    def _apply(self, p: torch.Tensor, update: torch.Tensor, lr: float) -> None:
        self.pre_weight_update_fn_inplace(p, update)
        p.add_(update, alpha=-lr)
        self.post_weight_update_fn_inplace(p)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:
        if closure is not None:
            raise ValueError("closure is not supported")
        for group in self.param_groups:
            self._init_group(group)
            extra = {k: v for k, v in group.items() if k != "params"}
            shapes: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if self._batchable(p):
                    key = (tuple(p.shape), p.dtype, p.device, getattr(p, GATED_FC1, False))
                    shapes.setdefault(key, []).append(p)
                    continue
                grad = self._momentum(p, group)
                with eo_utils.fp32_matmul_precision(self.fp32_matmul_prec):
                    update = self.orthogonalize(p, grad, **extra)
                self._apply(p, update, group["lr"])
            for (shape, *_, gated), params in shapes.items():
                blocks = 2 if gated else 1  # a gated fc1 is [gate; up]: two matrices
                rows, cols = shape[0] // blocks, shape[1]
                for chunk in _chunks(params, MAX_BATCH_ELEMENTS):
                    stacked = torch.stack([self._momentum(p, group) for p in chunk])
                    with eo_utils.fp32_matmul_precision(self.fp32_matmul_prec):
                        updates = newton_schulz(
                            stacked.view(-1, rows, cols), self.num_ns_steps, self.coefficient_type
                        ).reshape(stacked.shape)
                    updates.mul_(
                        get_muon_scale_factor(rows, cols, mode=self.scale_mode) * self.extra_scale_factor
                    )
                    for p, update in zip(chunk, updates.unbind(0), strict=True):
                        self._apply(p, update, group["lr"])
        return None


def _chunks(params: list[torch.Tensor], max_elements: int) -> Iterator[list[torch.Tensor]]:
    per_chunk = max(1, max_elements // max(params[0].numel(), 1))
    for start in range(0, len(params), per_chunk):
        yield params[start : start + per_chunk]
