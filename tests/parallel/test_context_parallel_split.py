"""The context-parallel batch split against brute-force references (one process, no groups).

The reference is written out with list slicing from the layout's definition: every document padded
to a multiple of ``2*CP`` at its end, cut into ``2*CP`` equal chunks, rank ``r`` holding chunks ``r``
and ``2*CP-1-r``.  For whole causal rows it is also checked against Megatron-Core's own
``get_batch_on_this_cp_rank``.
"""

from __future__ import annotations

import pytest
import torch

from joyai_megatron.model.context_parallel import pad_multiple, partition_indices
from joyai_megatron.training.packing import pack_batch, split_for_context_parallel


def _reference(docs: list[list[int]], cp: int, rank: int, multiple: int) -> tuple[list[int], list[int]]:
    """(tokens, padded document lengths) of ``rank``: -1 marks padding."""
    tokens, lengths = [], []
    for doc in docs:
        padded = doc + [-1] * (-len(doc) % multiple)
        lengths.append(len(padded))
        c = len(padded) // (2 * cp)
        tokens += padded[rank * c : (rank + 1) * c] + padded[(2 * cp - 1 - rank) * c : (2 * cp - rank) * c]
    return tokens, lengths


def _packed(doc_lengths: list[list[int]], seed: int = 0):
    """Rows of documents (``doc_lengths[row]``): tokens are their own flat index + 1000."""
    gen = torch.Generator().manual_seed(seed)
    rows = len(doc_lengths)
    width = sum(doc_lengths[0])
    assert all(sum(r) == width for r in doc_lengths)
    positions = torch.cat([torch.cat([torch.arange(n) for n in row]) for row in doc_lengths]).reshape(
        rows, width
    )
    tokens = torch.arange(rows * width).reshape(rows, width) + 1000
    loss_mask = (torch.rand(rows, width, generator=gen) > 0.2).float()
    return pack_batch(tokens, tokens + 5000, loss_mask, positions), tokens, loss_mask


CASES = {
    # name: (documents per row, cp, tp, sequence_parallel)
    "causal_rows": ([[64], [64]], 2, 1, False),
    "causal_rows_cp4": ([[64]], 4, 1, False),
    "documents": ([[37, 50, 41], [1, 127]], 2, 1, False),
    "documents_cp4": ([[9, 3, 100, 16]], 4, 1, False),
    "documents_sp": ([[37, 50, 41]], 2, 2, True),  # lcm(2*cp, cp*tp) = 4
    "documents_sp_tp4": ([[37, 50, 41]], 2, 4, True),  # lcm(4, 8) = 8
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_split_matches_the_reference_and_inverts(case: str) -> None:
    doc_lengths, cp, tp, sp = CASES[case]
    multiple = pad_multiple(cp, tp, sp)
    assert multiple % (2 * cp) == 0 and multiple % (cp * (tp if sp else 1)) == 0
    packed, tokens, loss_mask = _packed(doc_lengths)
    flat = tokens.reshape(-1)
    docs, start = [], 0
    for row in doc_lengths:
        for n in row:
            docs.append(flat[start : start + n].tolist())
            start += n
    pieces, sources = [], []
    for rank in range(cp):
        split = split_for_context_parallel(packed, cp_size=cp, cp_rank=rank, multiple=multiple)
        expected, padded_lengths = _reference(docs, cp, rank, multiple)
        got = split.tokens.reshape(-1)
        padding = split.padding_mask().reshape(-1)
        assert padding.tolist() == [t == -1 for t in expected]
        assert torch.where(padding, -1, got).tolist() == expected
        assert got[padding].eq(0).all()  # padding is token 0: what MTP's roll shifts in
        # Labels, loss mask and positions travel with their tokens; padding has loss mask 0.
        source = split.source
        assert (split.labels.reshape(-1)[~padding] == got[~padding] + 5000).all()
        assert (split.loss_mask.reshape(-1)[~padding] == loss_mask.reshape(-1)[source[~padding]]).all()
        assert split.loss_mask.reshape(-1)[padding].eq(0).all()
        doc_start = torch.tensor([0] + padded_lengths).cumsum(0)
        where = partition_indices(doc_start, cp, rank)
        doc = torch.searchsorted(doc_start[1:], where, right=True)
        assert split.position_ids.reshape(-1).tolist() == (where - doc_start[doc]).tolist()
        # The whole padded batch's boundaries, as Megatron-Core's RoPE/MTP roll and TE expect.
        params = split.packed_seq_params
        assert params.cu_seqlens_q.tolist() == doc_start.tolist() == params.cu_seqlens_kv_padded.tolist()
        assert params.max_seqlen_q == max(padded_lengths)
        assert split.tokens.numel() == sum(padded_lengths) // cp
        if sp:
            assert split.tokens.numel() % tp == 0
        pieces.append(got)
        sources.append(source)
    # Inverse: every token of the batch sits on exactly one rank; scattering back restores it.
    source = torch.cat(sources)
    real = source >= 0
    assert sorted(source[real].tolist()) == list(range(flat.numel()))
    restored = torch.empty_like(flat)
    restored[source[real]] = torch.cat(pieces)[real]
    assert torch.equal(restored, flat)


def test_cp1_is_the_batch_itself() -> None:
    packed, _, _ = _packed([[37, 50, 41]])
    assert split_for_context_parallel(packed, cp_size=1, cp_rank=0) is packed
    assert packed.padding_mask() is None


@pytest.mark.parametrize("cp", [2, 4])
def test_causal_rows_match_megatron_core(cp: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A micro-batch of one causal row: the same tokens as Megatron-Core's per-sequence split."""
    import torch.distributed as dist
    from megatron.core.utils import get_batch_on_this_cp_rank

    packed, tokens, loss_mask = _packed([[96]])
    for rank in range(cp):
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: cp)
        monkeypatch.setattr(dist, "get_rank", lambda group=None, r=rank: r)
        batch = {"tokens": tokens.clone(), "loss_mask": loss_mask.clone(), "cu_seqlens": None}
        upstream = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=object())
        mine = split_for_context_parallel(packed, cp_size=cp, cp_rank=rank)
        assert torch.equal(mine.tokens, upstream["tokens"])
        assert torch.equal(mine.loss_mask, upstream["loss_mask"])


def test_partition_refuses_unpadded_documents() -> None:
    with pytest.raises(ValueError, match="multiples of 2\\*cp = 4"):
        partition_indices(torch.tensor([0, 6, 10]), 2, 0)
