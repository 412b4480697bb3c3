"""MLA's values reach TE's core attention unpadded in packed (THD) batches (compat/mla.py), and
that computes what Megatron-Core's zero-padded call computes. Without TE the patch is not installed
(the local backend keeps the padding); here it is installed with the local core attention standing
in for TE's, which shows the dispatch and that unpadded values give the same loss and gradients.
TE's padded call is the one that was wrong: tests/gpu/test_te_local_gradients_gpu.py."""

from __future__ import annotations

import pytest
import torch

from joyai_megatron.compat import mla
from joyai_megatron.model.attention import SDPACoreAttention
from joyai_megatron.model.presets import get_preset
from joyai_megatron.training.checkpoint_model import build_megatron_model, init_single_process
from joyai_megatron.training.packing import pack_batch


def _widths_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[list[int], dict[str, torch.Tensor]]:
    """Value widths seen by each core attention, and every gradient, of one packed LM loss."""
    widths: list[int] = []
    hooks = [
        layer.self_attention.core_attention.register_forward_pre_hook(
            lambda _m, args: widths.append(args[2].shape[-1])
        )
        for layer in model.decoder.layers
    ]
    model.zero_grad()
    positions = torch.cat([torch.arange(24), torch.arange(40)]).expand_as(ids)  # two documents a row
    packed = pack_batch(ids, ids, torch.ones_like(ids), positions)
    logits = model(packed.tokens, packed.position_ids, None, packed_seq_params=packed.packed_seq_params)
    torch.nn.functional.cross_entropy(logits[0, :-1], packed.tokens[0, 1:]).backward()
    for h in hooks:
        h.remove()
    return widths, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the local backend's check, on CPU")
def test_te_attention_gets_unpadded_values_with_the_padded_calls_gradients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from megatron.core.transformer import multi_latent_attention

    init_single_process()
    assert multi_latent_attention._prepare_mla_core_attention_value is mla.UPSTREAM_VALUE_PREP  # no TE
    arch = get_preset("tiny").replace(v_head_dim=12, mtp_num_layers=0)  # q/k 16 + 8 = 24 wide
    model = build_megatron_model(arch, mtp=False)
    ids = torch.randint(0, arch.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    padded_widths, padded_grads = _widths_and_grads(model, ids)
    assert padded_widths == [24] * arch.num_layers  # upstream pads to the q/k width

    monkeypatch.setattr(mla, "_te_attention", SDPACoreAttention)
    monkeypatch.setattr(
        multi_latent_attention, "_prepare_mla_core_attention_value", mla._value_for_core_attention
    )
    widths, grads = _widths_and_grads(model, ids)
    assert widths == [12] * arch.num_layers
    assert grads.keys() == padded_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, padded_grads[name], rtol=1e-5, atol=1e-7, msg=name)
