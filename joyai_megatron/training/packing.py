"""Turn a [batch, seq] micro-batch of packed documents into Megatron's THD layout.

JoyAI trains on packed sequences with per-document attention.  Expressing document boundaries as
``cu_seqlens`` (rather than a dense [s, s] mask) lets TE's fused attention skip cross-document
blocks, restarts MLA's rotary positions per document, and keeps MTP's token roll inside each
document; the ``local`` backend reads the same ``cu_seqlens``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams


@dataclass
class PackedBatch:
    tokens: torch.Tensor  # [1, t]
    labels: torch.Tensor  # [1, t]
    loss_mask: torch.Tensor  # [1, t] float
    position_ids: torch.Tensor  # [1, t]
    packed_seq_params: PackedSeqParams

    def to(self, device: torch.device) -> PackedBatch:
        """Copy to ``device``; to a GPU from pinned memory without blocking the host (a pageable
        copy waits for the GPU queue to drain: one sync per tensor per micro-batch)."""
        params = self.packed_seq_params
        for name in ("cu_seqlens_q", "cu_seqlens_kv"):
            setattr(params, name, _to(getattr(params, name), device))
        return PackedBatch(
            _to(self.tokens, device),
            _to(self.labels, device),
            _to(self.loss_mask, device),
            _to(self.position_ids, device),
            params,
        )


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if torch.device(device).type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def cu_seqlens_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Segment starts are where positions restart at 0; every row also starts a segment."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0, as_tuple=False).flatten()
    row_starts = torch.arange(0, flat.numel(), position_ids.shape[-1], device=flat.device)
    starts = torch.unique(torch.cat([starts, row_starts]))
    total = torch.tensor([flat.numel()], device=flat.device)
    return torch.cat([starts, total]).to(torch.int32)


def pack_batch(
    tokens: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
) -> PackedBatch:
    """Flatten rows into one THD sequence; ``cu_seqlens`` defaults to position restarts."""
    if cu_seqlens is None:
        cu_seqlens = cu_seqlens_from_positions(position_ids)
    cu_seqlens = cu_seqlens.to(device=tokens.device, dtype=torch.int32)
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=max_len,
        max_seqlen_kv=max_len,
    )
    return PackedBatch(
        tokens=tokens.reshape(1, -1),
        labels=labels.reshape(1, -1),
        loss_mask=loss_mask.reshape(1, -1).float(),
        position_ids=position_ids.reshape(1, -1),
        packed_seq_params=params,
    )
