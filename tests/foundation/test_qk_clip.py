"""QK-clip (MuonClip for MLA, ``model.qk_clip``) through the trainer on the tiny model.

After the optimizer step the trainer calls Megatron-Core's ``clip_qk``.  For each decoder attention
layer with per-head largest logit S_h over the step (``SDPACoreAttention`` records it), threshold tau
and alpha, eta_h = min(1, tau / S_h), and when some S_h > tau:
  * ``linear_q_up_proj`` rows of head h: the no-RoPE query part x eta_h ** alpha, the RoPE part
    x eta_h;
  * ``linear_kv_up_proj`` rows of head h: the key part x eta_h ** (1 - alpha), the value part as is;
  * nothing else changes (the RoPE key comes from ``linear_kv_down_proj``, shared by all heads).
Every logit of head h is then scaled by eta_h exactly, so the first layer (whose input does not
depend on any clipped weight) must see max(logit) = min(S_h, tau) on the same batch.  With tau
above every S_h no weight changes at all.
"""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.num_microbatches_calculator import get_num_microbatches

from joyai_megatron.training.distributed import shutdown
from joyai_megatron.training.trainer import Trainer
from tests.foundation.foundation_helpers import tiny_trainer

ALPHA = 0.3  # not 0.5, so the query and key shares of the clip differ


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory):
    """A tiny trainer with qk-clip after one real train step (the trainer's own clip call)."""
    trainer = tiny_trainer(tmp_path_factory.mktemp("qk_clip"), "model.qk_clip=true", "train.train_iters=1")
    trainer.config.qk_clip_alpha = ALPHA
    values = trainer.train_step()
    assert math.isfinite(values["max_attention_logit"]) and values["max_attention_logit"] > 0
    yield trainer
    shutdown()


def _attention_layers(trainer: Trainer) -> list:
    return [layer.self_attention for layer in trainer.model[0].module.decoder.layers]


def _forward(trainer: Trainer) -> list[torch.Tensor]:
    """One forward pass over the first batch; the per-head largest logit of every decoder layer."""
    batches = trainer.stage.microbatches("train", 0, get_num_microbatches())
    with torch.no_grad():
        trainer.run_microbatches(batches, forward_only=True)
    return [a.core_attention.current_max_attn_logits.clone() for a in _attention_layers(trainer)]


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model[0].module.named_parameters()}


def _expected_up_projections(attention, q_up: torch.Tensor, kv_up: torch.Tensor, eta: torch.Tensor):
    """The written-out clip of one layer's query and key/value up-projections."""
    c = attention.config
    heads = attention.num_attention_heads_per_partition
    eta = eta.double().view(heads, 1, 1)
    q = q_up.double().view(heads, c.qk_head_dim + c.qk_pos_emb_head_dim, -1).clone()
    q[:, : c.qk_head_dim] *= eta**ALPHA
    q[:, c.qk_head_dim :] *= eta
    kv = kv_up.double().view(heads, c.qk_head_dim + c.v_head_dim, -1).clone()
    kv[:, : c.qk_head_dim] *= eta ** (1 - ALPHA)
    return q.view_as(q_up), kv.view_as(kv_up)


def test_no_clip_below_the_threshold(trainer) -> None:
    logits = _forward(trainer)
    before = _weights(trainer)
    trainer.config.qk_clip_threshold = 2 * max(float(s.max()) for s in logits)
    assert trainer.clip_qk() == pytest.approx(max(float(s.max()) for s in logits))
    after = _weights(trainer)
    assert all(torch.equal(after[n], before[n]) for n in before), [
        n for n in before if not torch.equal(after[n], before[n])
    ]
    assert all(a.core_attention.current_max_attn_logits is None for a in _attention_layers(trainer))


def test_clip_rescales_the_heads_above_the_threshold(trainer) -> None:
    logits = _forward(trainer)
    before = _weights(trainer)
    tau = float(torch.cat(logits).median())  # some heads of each layer above, some below
    trainer.config.qk_clip_threshold = tau
    trainer.clip_qk()
    after = _weights(trainer)
    clipped = set()
    for i, (attention, s) in enumerate(zip(_attention_layers(trainer), logits, strict=True)):
        eta = torch.clamp(tau / s, max=1.0)
        prefix = f"decoder.layers.{i}.self_attention."
        q_name, kv_name = prefix + "linear_q_up_proj.weight", prefix + "linear_kv_up_proj.weight"
        if bool((s > tau).any()):
            q, kv = _expected_up_projections(attention, before[q_name], before[kv_name], eta)
            torch.testing.assert_close(after[q_name].double(), q, rtol=1e-6, atol=0)
            torch.testing.assert_close(after[kv_name].double(), kv, rtol=1e-6, atol=0)
            clipped |= {q_name, kv_name}
    assert len(clipped) >= 2, "the median threshold clipped no layer"
    unchanged = [n for n in before if n not in clipped and not torch.equal(after[n], before[n])]
    assert not unchanged, unchanged
    # Layer 0 sees the same input again: its logits of head h are now eta_h x the old ones.
    torch.testing.assert_close(_forward(trainer)[0], torch.clamp(logits[0], max=tau), rtol=1e-5, atol=1e-6)
