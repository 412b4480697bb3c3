"""Transformer Engine's core attention at MLA's head dims against fp32 math (skipped without CUDA/TE).

MLA attends with 192-dim queries/keys (128 no-RoPE + 64 RoPE) and 128-dim values, scaled by
``192 ** -0.5``. The ``te`` backend hands this to ``TEDotProductAttention`` (cuDNN fused attention);
the ``local`` backend to PyTorch SDPA, whose gradients equal transformers' DeepseekV3
(tests/convert/test_logits.py). This checks the TE side in both layouts the model uses: packed THD
(pretraining, per-document causal) and ``sbhd``. Inputs have unit variance so that attention is
peaked: at init-scale inputs softmax is near uniform and a wrong scale would hide in the forward.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.joyai_helpers import relative_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
needs_te = pytest.mark.skipif(
    importlib.util.find_spec("transformer_engine") is None, reason="needs Transformer Engine"
)

HEADS, QK_DIM, V_DIM = 8, 192, 128
SCALE = QK_DIM**-0.5
CU_SEQLENS = [0, 300, 700, 1024]


def _reference(q, k, v, d_out, allowed):
    """fp32 ``softmax(q k^T * scale) v`` over [b, h, s, d] with a boolean ``allowed`` [s, s]."""
    q, k, v = (x.detach().float().requires_grad_() for x in (q, k, v))
    logits = (q @ k.transpose(-1, -2)) * SCALE
    out = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1) @ v
    out.backward(d_out.float())
    return out.detach(), q.grad, k.grad, v.grad


def _block_causal(cu: list[int]) -> torch.Tensor:
    """Per-document causal mask, written here rather than taken from model/attention.py: the
    reference must not share code with the local backend it checks."""
    t = cu[-1]
    doc = torch.zeros(t, dtype=torch.long)
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:], strict=False)):
        doc[a:b] = i
    pos = torch.arange(t)
    return ((doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])).cuda()


@pytest.fixture(scope="module")
def megatron_groups():
    from joyai_megatron.training.checkpoint_model import init_single_process

    init_single_process()


def _core_attention(backend: str):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    if backend == "te":
        from megatron.core.extensions.transformer_engine import TEDotProductAttention as cls
    else:
        from joyai_megatron.model.attention import SDPACoreAttention as cls

    config = TransformerConfig(
        num_layers=1,
        hidden_size=HEADS * V_DIM,
        num_attention_heads=HEADS,
        kv_channels=QK_DIM,
        attention_dropout=0.0,
        bf16=True,
        params_dtype=torch.bfloat16,
    )
    return cls(
        config,
        layer_number=1,
        attn_mask_type=AttnMaskType.causal,
        attention_type="self",
        softmax_scale=SCALE,
        k_channels=QK_DIM,
        v_channels=V_DIM,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )


@pytest.mark.parametrize("layout", ["thd", "sbhd"])
@pytest.mark.parametrize("backend", [pytest.param("te", marks=needs_te), "local"])
def test_core_attention_matches_fp32_math_at_mla_head_dims(
    megatron_groups, backend: str, layout: str
) -> None:
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    torch.manual_seed(0)
    t = CU_SEQLENS[-1]
    q, k = (torch.randn(t, HEADS, QK_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(t, HEADS, V_DIM, device="cuda", dtype=torch.bfloat16)
    d_out = torch.randn(t, HEADS * V_DIM, device="cuda", dtype=torch.bfloat16)
    attention = _core_attention(backend)
    if layout == "thd":
        cu = torch.tensor(CU_SEQLENS, device="cuda", dtype=torch.int32)
        longest = max(b - a for a, b in zip(CU_SEQLENS[:-1], CU_SEQLENS[1:], strict=False))
        params = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest
        )
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        allowed = _block_causal(CU_SEQLENS)
    else:  # one sequence, batch 1: [s, 1, h, d]
        params = None
        inputs = [x.unsqueeze(1).clone().requires_grad_() for x in (q, k, v)]
        allowed = torch.ones(t, t, dtype=torch.bool, device="cuda").tril()
    out = attention(
        *inputs, attention_mask=None, attn_mask_type=AttnMaskType.causal, packed_seq_params=params
    )
    out.reshape(t, -1).backward(d_out)
    ref_out, ref_dq, ref_dk, ref_dv = _reference(
        *(x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)),
        d_out.view(t, HEADS, V_DIM).transpose(0, 1).unsqueeze(0),
        allowed,
    )
    got = {
        "out": out.reshape(t, HEADS, V_DIM),
        "dq": inputs[0].grad.reshape(t, HEADS, QK_DIM),
        "dk": inputs[1].grad.reshape(t, HEADS, QK_DIM),
        "dv": inputs[2].grad.reshape(t, HEADS, V_DIM),
    }
    want = {
        "out": ref_out[0].transpose(0, 1),
        "dq": ref_dq[0].transpose(0, 1),
        "dk": ref_dk[0].transpose(0, 1),
        "dv": ref_dv[0].transpose(0, 1),
    }
    errors = {name: relative_error(got[name], want[name]) for name in got}
    norms = {name: float(got[name].float().norm() / want[name].norm()) for name in got}
    print(f"{backend} {layout}: relative error {errors}, norm ratio {norms}")
    # bf16 inputs and outputs: relative error of a whole tensor stays near bf16's 2^-8 = 0.4%.
    assert all(e < 0.02 for e in errors.values()), (
        f"{backend} {layout}: relative errors {errors}, norm ratios {norms}"
    )
