"""Where each token of a packed (THD) micro-batch lives under context parallelism.

Megatron-Core leaves splitting a batch over the CP ranks to the caller; its ``get_batch_on_this_cp_rank``
and Transformer Engine's CP attention expect the *dual-chunk* layout: every document (``cu_seqlens``
segment) is cut into ``2*CP`` equal chunks and CP rank ``r`` holds chunks ``r`` and ``2*CP-1-r``, so
each rank gets the same share of causal attention work.  This is what TE's
``thd_get_partitioned_indices`` computes for THD batches; a batch of whole causal rows is the same
layout with one document per row (for one row it is ``_get_batch_on_this_cp_rank_per_sequence_balancing``).
Every document must therefore be a multiple of ``2*CP`` long; :func:`padded_cu_seqlens` pads each
one at its end (Megatron-Bridge's ``pad_seq_to_mult``, :func:`pad_multiple`).

These are pure index computations, shared by the batch split (``training/packing.py``) and the
``local`` backend's CP attention (``model/attention.py``), so both always agree on the layout.
"""

from __future__ import annotations

import math

import torch


def pad_multiple(cp: int, tp: int = 1, sequence_parallel: bool = False) -> int:
    """Each document's length must be a multiple of this (Megatron-Bridge's ``pad_seq_to_mult``):
    ``2*CP`` for the dual-chunk split, and ``CP*TP`` under sequence parallelism so every CP rank's
    share of every document also splits evenly over the TP ranks.  1 without CP."""
    if cp <= 1:
        return 1
    return math.lcm(2 * cp, cp * tp if sequence_parallel and tp > 1 else 1)


def padded_cu_seqlens(cu_seqlens: torch.Tensor, multiple: int) -> torch.Tensor:
    """Segment boundaries after padding every segment up to a multiple of ``multiple``."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    padded = (lengths + multiple - 1) // multiple * multiple
    return torch.cat([cu_seqlens.new_zeros(1), padded.cumsum(0).to(cu_seqlens.dtype)])


def partition_indices(cu_seqlens: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions (in the whole packed sequence) of CP rank ``cp_rank``'s tokens, in the order the
    rank holds them: for every segment, its chunk ``cp_rank`` then its chunk ``2*cp_size-1-cp_rank``
    (TE's ``thd_get_partitioned_indices``).  Every segment length must be a multiple of ``2*cp_size``."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    slices = 2 * cp_size
    if bool((lengths % slices).any()):
        raise ValueError(
            f"context parallelism: segment lengths {lengths.tolist()} must be multiples of 2*cp = {slices} "
            "(pad every document first: training.packing.split_for_context_parallel does)"
        )
    if cp_size == 1:
        return torch.arange(int(cu[-1]), device=cu.device)
    chunk = lengths // slices  # per segment
    local = 2 * chunk  # tokens of each segment on one rank
    segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), local)
    local_start = torch.cumsum(local, 0) - local
    j = (
        torch.arange(segment.numel(), device=cu.device) - local_start[segment]
    )  # offset inside the segment's share
    c = chunk[segment]
    first = j < c
    within = torch.where(first, cp_rank * c + j, (slices - 1 - cp_rank) * c + (j - c))
    return cu[:-1][segment] + within


def all_partition_indices(cu_seqlens: torch.Tensor, cp_size: int) -> torch.Tensor:
    """Positions of the tokens of all CP ranks, concatenated in rank order: the order an all-gather
    over the CP group returns them in."""
    return torch.cat([partition_indices(cu_seqlens, cp_size, r) for r in range(cp_size)])


def segment_ids(positions: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The segment (document) each position belongs to."""
    return torch.searchsorted(cu_seqlens.long()[1:], positions.long(), right=True)
