"""Megatron-Core's ``optimizer="muon"`` registry entry builds :class:`BatchedMuon`.

``megatron/core/optimizer/emerging_optimizers.py`` maps the name ``"muon"`` to
``TensorParallelMuon`` in ``_EMERGING_OPTIMIZERS`` (read by ``get_megatron_optimizer`` at build
time); :class:`joyai_megatron.optim.muon.BatchedMuon` is that class with the Newton-Schulz of
same-shaped matrices batched (the same update, ``optim/muon.py`` says why).
"""

from __future__ import annotations

from megatron.core.optimizer import emerging_optimizers as mcore_eo


def use_batched_muon() -> bool:
    """Point the registry entry at :class:`BatchedMuon` (idempotent); returns whether it changed."""
    from joyai_megatron.optim.muon import BatchedMuon

    entry = mcore_eo._EMERGING_OPTIMIZERS["muon"]
    if entry.optimizer_cls is BatchedMuon:
        return False
    entry.optimizer_cls = BatchedMuon
    return True
