"""The export is the same model: transformers' logits and generations, and the MTP head."""

from __future__ import annotations

import pytest
import torch

from joyai_megatron.convert.live import hf_named_tensors
from joyai_megatron.convert.megatron_model import megatron_greedy, megatron_logits
from tests.convert.convert_helpers import hf_tensors, tiny_config

IDS = torch.randint(2, 512, (2, 24), generator=torch.Generator().manual_seed(1234))


def test_export_loads_in_transformers_without_missing_keys(tiny_export, megatron_model):
    from transformers import DeepseekV3ForCausalLM

    _, arch = megatron_model
    _, info = DeepseekV3ForCausalLM.from_pretrained(
        tiny_export, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"]
    assert not info["mismatched_keys"]
    mtp = f"model.layers.{arch.num_layers}."
    assert info["unexpected_keys"] and all(k.startswith(mtp) for k in info["unexpected_keys"])


def test_logits_and_greedy_generation_match(megatron_model, hf_model):
    model, _ = megatron_model
    ours, _ = megatron_logits(model, IDS)
    with torch.no_grad():
        theirs = hf_model(IDS).logits
    diff = (ours - theirs).abs().max().item()
    print(f"max |logit diff| megatron vs transformers: {diff:.3g}")
    assert diff <= 1e-4

    prompt = IDS[:, :8]
    with torch.no_grad():
        hf_tokens = hf_model.generate(
            prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0
        )[:, 8:]
    assert torch.equal(megatron_greedy(model, prompt, 20), hf_tokens)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@torch.no_grad()
def reference_mtp_logits(hf_model, tensors: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's MTP forward from the exported HF tensors, as vLLM's deepseek_mtp runs it.

    Position i combines h_i (the main model's final hidden state, after ``model.norm``) with the
    embedding of token i+1 and predicts token i+2:
    ``head(shared_head.norm(layer(eh_proj(cat[enorm(emb(t_{i+1})), hnorm(h_i)]))))``, positions 0..s-2.
    """
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3DecoderLayer,
        DeepseekV3RotaryEmbedding,
    )

    cfg = tiny_config()
    n, eps = cfg.num_hidden_layers, cfg.rms_norm_eps
    p = f"model.layers.{n}."
    dense = tiny_config(first_k_dense_replace=n + 1)  # JoyAI's MTP layer has a dense FFN
    dense._attn_implementation = "eager"
    layer = DeepseekV3DecoderLayer(dense, layer_idx=n).eval()
    layer.load_state_dict({k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)}, strict=False)
    missing = [k for k in layer.state_dict() if p + k not in tensors]
    assert not missing, missing

    h = hf_model.model(ids).last_hidden_state[:, :-1]  # h_0 .. h_{s-2}
    e = torch.nn.functional.embedding(ids[:, 1:], tensors[p + "embed_tokens.weight"])  # t_1 .. t_{s-1}
    x = torch.cat([_rms(e, tensors[p + "enorm.weight"], eps), _rms(h, tensors[p + "hnorm.weight"], eps)], -1)
    x = x @ tensors[p + "eh_proj.weight"].T
    s = x.shape[1]
    positions = torch.arange(s).unsqueeze(0)
    cos, sin = DeepseekV3RotaryEmbedding(dense)(x, positions)
    mask = torch.full((s, s), float("-inf")).triu(1)[None, None]
    x = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=(cos, sin))
    return _rms(x, tensors[p + "shared_head.norm.weight"], eps) @ tensors[p + "shared_head.head.weight"].T


def test_mtp_logits_match_an_independent_deepseek_mtp(megatron_model, hf_model, tiny_export):
    model, _ = megatron_model
    _, ours = megatron_logits(model, IDS)
    reference = reference_mtp_logits(hf_model, hf_tensors(tiny_export), IDS)
    diff = (ours[:, :-1] - reference).abs().max().item()  # Megatron's last position sees a rolled-in pad
    print(f"max |MTP logit diff|: {diff:.3g}")
    assert diff <= 1e-4
    assert reference.abs().max() > 1e-2  # a real signal, not two zeros


def test_live_model_tensors_are_the_export(megatron_model, tiny_export):
    """The per-tensor path the RL weight sync uses yields exactly the exported tensors."""
    model, arch = megatron_model
    live = dict(hf_named_tensors(model, arch))
    exported = hf_tensors(tiny_export)
    assert sorted(live) == sorted(exported)
    for name, tensor in live.items():
        assert torch.equal(tensor, exported[name]), name


def _grad_norms_by_block(named: list[tuple[str, torch.Tensor]], layer_key: str) -> dict[str, float]:
    """Root-sum-square of the gradients per block (embedding, each layer's attention, MLP and norms,
    final norm, head): a block's gradient norm does not depend on how its tensors are split or
    named, so Megatron's and transformers' can be compared without the conversion mapping."""
    sums: dict[str, float] = {}
    for name, grad in named:
        parts = name.split(".")
        if layer_key in name:
            i = parts[parts.index("layers") + 1]
            kind = "norm" if ("input_layernorm" in name or "pre_mlp" in name or "post_attention" in name) else (
                "attn" if ("self_attention" in name or "self_attn" in name) else "mlp")  # fmt: skip
            block = f"layer{i}.{kind}"
        elif "embed" in name:
            block = "embedding"
        elif "output_layer" in name or "lm_head" in name:
            block = "head"
        else:
            block = "final_norm"
        sums[block] = sums.get(block, 0.0) + float(grad.double().pow(2).sum())
    return {k: v**0.5 for k, v in sums.items()}


def test_gradients_match_transformers(megatron_model, hf_model, tiny_ckpt):
    """The backward pass, not only the forward: the LM loss's gradient of every block equals
    transformers' (the local backend is what the te backend is compared against on GPUs).  Without
    the MTP block: it adds its own loss inside ``GPTModel.forward`` even without labels."""
    from joyai_megatron.training.checkpoint import load_model_weights
    from joyai_megatron.training.checkpoint_model import build_megatron_model

    _, arch = megatron_model
    arch = arch.replace(mtp_num_layers=0)
    model = build_megatron_model(arch)
    load_model_weights(model, tiny_ckpt / "iter_0000000")
    positions = torch.arange(IDS.shape[1]).unsqueeze(0).expand_as(IDS)
    loss_fn = torch.nn.functional.cross_entropy
    try:
        logits = model(IDS, positions, None)
        loss_fn(logits[:, :-1].flatten(0, 1), IDS[:, 1:].flatten()).backward()
        theirs_logits = hf_model(IDS).logits
        loss_fn(theirs_logits[:, :-1].flatten(0, 1), IDS[:, 1:].flatten()).backward()
        ours = _grad_norms_by_block(
            [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None], "decoder.layers."
        )
        theirs = _grad_norms_by_block(
            [(n, p.grad) for n, p in hf_model.named_parameters() if p.grad is not None], "model.layers."
        )
    finally:
        hf_model.zero_grad(set_to_none=True)
    assert set(ours) == set(theirs) and len(ours) == 3 + 3 * arch.num_layers, (sorted(ours), sorted(theirs))
    for block, norm in theirs.items():
        assert ours[block] == pytest.approx(norm, rel=1e-4), (block, ours[block], norm)
