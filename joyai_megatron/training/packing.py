"""Turn a [batch, seq] micro-batch of packed documents into Megatron's THD layout, and split it
over the context-parallel ranks.

JoyAI trains on packed sequences with per-document attention.  Expressing document boundaries as
``cu_seqlens`` (rather than a dense [s, s] mask) lets TE's fused attention skip cross-document
blocks, restarts MLA's rotary positions per document, and keeps MTP's token roll inside each
document; the ``local`` backend reads the same ``cu_seqlens``.

Every stage packs its micro-batch with :func:`pack_batch` and then calls
:func:`split_for_context_parallel`, the one place a batch is cut over CP ranks (a no-op at CP=1).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from joyai_megatron.model.context_parallel import (
    pad_multiple,
    padded_cu_seqlens,
    partition_indices,
    segment_ids,
)


@dataclass
class PackedBatch:
    tokens: torch.Tensor  # [1, t]
    labels: torch.Tensor  # [1, t]
    loss_mask: torch.Tensor  # [1, t] float
    position_ids: torch.Tensor  # [1, t]
    packed_seq_params: PackedSeqParams
    # Under context parallelism: for each token this rank holds, its index in the flattened batch
    # before the split, or -1 for padding added to make documents multiples of 2*CP.  None at CP=1.
    source: torch.Tensor | None = None

    def local(self, values: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """Any per-token tensor of the batch (shaped like the rows passed to :func:`pack_batch`) as
        this rank holds it: [1, t], ``fill`` at padding positions."""
        flat = values.reshape(-1)
        if self.source is None:
            return flat.reshape(1, -1)
        src = self.source.to(flat.device)
        out = torch.where(src >= 0, flat[src.clamp(min=0)], torch.full_like(src, fill, dtype=flat.dtype))
        return out.reshape(1, -1)

    def padding_mask(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """[1, t] bool, True at the padding context parallelism added (GPTModel's ``padding_mask``:
        kept out of the MoE routers' load counts); None at CP=1."""
        if self.source is None:
            return None
        return _to((self.source < 0).reshape(1, -1), torch.device(device))

    def to(self, device: torch.device) -> PackedBatch:
        """Copy to ``device``; to a GPU from pinned memory without blocking the host (a pageable
        copy waits for the GPU queue to drain: one sync per tensor per micro-batch)."""
        params = self.packed_seq_params
        for name in ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
            if getattr(params, name) is not None:
                setattr(params, name, _to(getattr(params, name), device))
        return PackedBatch(
            _to(self.tokens, device),
            _to(self.labels, device),
            _to(self.loss_mask, device),
            _to(self.position_ids, device),
            params,
            self.source,
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


def split_for_context_parallel(
    packed: PackedBatch,
    *,
    sequence_parallel: bool = False,
    cp_size: int | None = None,
    cp_rank: int | None = None,
    multiple: int | None = None,
) -> PackedBatch:
    """This CP rank's share of a packed micro-batch (the batch itself at CP=1).

    Every document is padded at its end to a multiple of ``multiple`` (default: :func:`pad_multiple`
    of the current layout, ``2*CP`` or ``lcm(2*CP, CP*TP)`` under sequence parallelism), then the rank
    keeps chunks ``r`` and ``2*CP-1-r`` of every document (``model/context_parallel.py``).  The CP
    size and rank come from Megatron-Core's process groups unless given (tests pass them).  Padding
    tokens are token 0 (the value Megatron-Core's MTP roll shifts in at a document's end, so the last
    real token's MTP input is the same as without padding), label 0, loss mask 0, and positions that
    continue the document; they sit after their document's real tokens, so causal attention keeps
    them out of every real token's context, and they count in no loss.

    Tokens, labels, loss mask and positions are split; ``cu_seqlens`` (and their ``_padded`` copies,
    which TE's CP attention requires for THD) stay those of the whole padded batch, as Megatron-Core's
    MLA RoPE, MTP roll and TE expect.  Call it on the host, before :meth:`PackedBatch.to`.
    """
    if cp_size is None or cp_rank is None:
        from megatron.core import parallel_state

        cp_size = parallel_state.get_context_parallel_world_size()
        cp_rank = parallel_state.get_context_parallel_rank()
        if multiple is None:
            tp = parallel_state.get_tensor_model_parallel_world_size()
            multiple = pad_multiple(cp_size, tp, sequence_parallel)
    if cp_size == 1:
        return packed
    multiple = multiple or pad_multiple(cp_size)
    if multiple % (2 * cp_size):
        raise ValueError(
            f"context parallelism: pad multiple {multiple} is not a multiple of 2*cp={2 * cp_size}"
        )
    cu = packed.packed_seq_params.cu_seqlens_q.cpu().long()
    padded = padded_cu_seqlens(cu, multiple)
    lengths = cu[1:] - cu[:-1]
    position = partition_indices(padded, cp_size, cp_rank)
    segment = segment_ids(position, padded)
    offset = position - padded[segment]
    source = torch.where(offset < lengths[segment], cu[:-1][segment] + offset, torch.full_like(offset, -1))
    split = replace(packed, source=source)
    positions = torch.where(source >= 0, split.local(packed.position_ids.cpu()).reshape(-1), offset).reshape(
        1, -1
    )
    cu32 = padded.to(torch.int32)
    max_len = int((padded[1:] - padded[:-1]).max())
    params = replace(
        packed.packed_seq_params,
        cu_seqlens_q=cu32,
        cu_seqlens_kv=cu32,
        cu_seqlens_q_padded=cu32,
        cu_seqlens_kv_padded=cu32,
        max_seqlen_q=max_len,
        max_seqlen_kv=max_len,
    )
    return PackedBatch(
        tokens=split.local(packed.tokens.cpu(), 0),
        labels=split.local(packed.labels.cpu(), 0),
        loss_mask=split.local(packed.loss_mask.cpu(), 0),
        position_ids=positions.to(packed.position_ids.dtype),
        packed_seq_params=params,
        source=source,
    )
