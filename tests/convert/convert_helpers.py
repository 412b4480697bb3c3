"""A tiny random DeepseekV3 checkpoint with JoyAI's structure (dense layer 0, MoE, dense MTP)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TINY_HF_CONFIG = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    routed_scaling_factor=2.5,
    kv_lora_rank=32,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    v_head_dim=16,
    qk_nope_head_dim=16,
    n_group=1,
    topk_group=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    norm_topk_prob=True,
    max_position_embeddings=1024,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    num_nextn_predict_layers=1,
    initializer_range=0.02,
    bos_token_id=0,
    eos_token_id=1,
    # DeepSeek-V3 / JoyAI release fields that transformers does not define but vLLM and SGLang read.
    topk_method="noaux_tc",
    scoring_func="sigmoid",
    moe_layer_freq=1,
    ep_size=1,
)


def tiny_config(**overrides):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(**{**TINY_HF_CONFIG, **overrides})


def _mtp_tensors(cfg, main: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """HF tensors of the dense MTP layer (transformers drops them, so the test makes its own)."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    n, h = cfg.num_hidden_layers, cfg.hidden_size
    dense_cfg = DeepseekV3Config(**{**cfg.to_dict(), "first_k_dense_replace": n + 1})
    layer = DeepseekV3DecoderLayer(dense_cfg, layer_idx=n)
    out = {}
    for name, p in layer.state_dict().items():
        out[f"model.layers.{n}.{name}"] = torch.randn(p.shape, generator=gen) * (
            0.3 if p.ndim == 1 else 0.05
        ) + (1.0 if p.ndim == 1 else 0.0)
    p = f"model.layers.{n}."
    out[p + "enorm.weight"] = 1 + 0.3 * torch.randn(h, generator=gen)
    out[p + "hnorm.weight"] = 1 + 0.3 * torch.randn(h, generator=gen)
    out[p + "eh_proj.weight"] = 0.05 * torch.randn(h, 2 * h, generator=gen)
    out[p + "shared_head.norm.weight"] = 1 + 0.3 * torch.randn(h, generator=gen)
    out[p + "embed_tokens.weight"] = main["model.embed_tokens.weight"].clone()
    out[p + "shared_head.head.weight"] = main["lm_head.weight"].clone()
    return out


def make_tiny_hf(
    path: Path, seed: int = 0, dtype: torch.dtype = torch.float32, mtp: bool = True, **overrides
) -> Path:
    """Random-init ``DeepseekV3ForCausalLM`` saved in two shards with an index, plus MTP tensors.

    Norm weights and router biases are randomised too: left at ones/zeros, a swapped or
    transposed norm would go unnoticed.
    """
    from transformers import DeepseekV3ForCausalLM

    cfg = tiny_config(**overrides)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("norm.weight"):
                t.copy_(1 + 0.3 * torch.randn(t.shape, generator=gen))
            elif name.endswith("e_score_correction_bias"):
                t.copy_(0.1 * torch.randn(t.shape, generator=gen))
            elif t.ndim >= 2:
                t.copy_(0.05 * torch.randn(t.shape, generator=gen))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    if mtp:
        tensors.update(_mtp_tensors(cfg, tensors, gen))
    tensors = {
        k: (v if k.endswith("e_score_correction_bias") else v.to(dtype)).contiguous()
        for k, v in tensors.items()
    }
    names = sorted(tensors)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if not mtp:
        cfg_json = json.loads((path / "config.json").read_text())
        cfg_json["num_nextn_predict_layers"] = 0
        (path / "config.json").write_text(json.dumps(cfg_json, indent=2))
    return path


def hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    from joyai_megatron.convert.hf_io import HFCheckpoint

    ckpt = HFCheckpoint(path)
    return {n: ckpt.get(n) for n in ckpt.names()}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def save_with_megatron(model: torch.nn.Module, directory: Path) -> None:
    """``dist_checkpointing.save`` from this process, as the trainer does."""
    from megatron.core import dist_checkpointing

    directory.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(directory))
