"""``config.json`` <-> :class:`ModelArch`: the shapes travel with the checkpoint, never by hand.

The export writes DeepSeek-V3's own field set (what vLLM and SGLang read: ``rope_theta``,
``rope_scaling``, ``topk_method``, ``scoring_func``, ``moe_layer_freq``...) plus the fields
transformers 5 adds (``rope_interleave``), so one file serves ``DeepseekV3ForCausalLM`` and the
serving engines.  The import accepts that layout, transformers 5's ``rope_parameters`` form and
``model_type: joyai_llm_flash``, and refuses the DeepSeek-V3 variants our Megatron model does not
implement (group-limited routing, YaRN, softmax gating) rather than converting them wrongly.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from joyai_megatron.convert.common import ConversionError, copy_tokenizer_files
from joyai_megatron.model.presets import ModelArch

MODEL_TYPES = ("deepseek_v3", "joyai_llm_flash")
ARCHITECTURE = "DeepseekV3ForCausalLM"


def load_hf_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir}: no config.json")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConversionError("malformed config.json", str(path), str(err), "restore the file") from err
    if not isinstance(config, dict):
        raise ConversionError("malformed config.json", str(path), "not a JSON object", "restore the file")
    return config


def _rope(cfg: dict[str, Any]) -> tuple[float, str]:
    """(rope_theta, rope_type) from either the legacy or the transformers-5 layout."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = cfg.get("rope_theta", params.get("rope_theta"))
    if theta is None:
        raise ConversionError("config.json has neither rope_theta nor rope_parameters.rope_theta")
    rope_type = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type") or "default"
    return float(theta), rope_type


def _require(cfg: dict[str, Any], key: str, allowed: tuple[Any, ...], why: str) -> None:
    if key in cfg and cfg[key] is not None and cfg[key] not in allowed:
        raise ConversionError(f"config.json {key}={cfg[key]!r} is not supported ({why}); expected {allowed}")


def arch_from_hf_config(cfg: dict[str, Any]) -> ModelArch:
    """The Megatron-side architecture of a DeepseekV3-shaped ``config.json``."""
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConversionError(f"config.json model_type={model_type!r}; expected one of {MODEL_TYPES}")
    _require(cfg, "n_group", (1,), "group-limited routing is not configured in our Megatron model")
    _require(cfg, "topk_group", (1,), "group-limited routing is not configured in our Megatron model")
    _require(cfg, "scoring_func", ("sigmoid",), "the router uses sigmoid scores")
    _require(cfg, "topk_method", ("noaux_tc",), "the router uses the aux-loss-free expert bias")
    _require(cfg, "norm_topk_prob", (True,), "the router normalises the top-k weights")
    _require(cfg, "hidden_act", ("silu",), "the FFNs are SwiGLU")
    _require(cfg, "attention_bias", (False,), "MLA projections have no bias")
    _require(cfg, "tie_word_embeddings", (False,), "JoyAI keeps embedding and LM head separate")
    _require(cfg, "moe_layer_freq", (1,), "every layer after first_k_dense_replace is MoE")
    if cfg.get("num_key_value_heads", cfg["num_attention_heads"]) != cfg["num_attention_heads"]:
        raise ConversionError("config.json num_key_value_heads must equal num_attention_heads under MLA")
    theta, rope_type = _rope(cfg)
    if rope_type != "default":
        raise ConversionError(
            f"config.json uses rope type {rope_type!r}; our MLA config implements plain RoPE only "
            "(JoyAI-LLM Flash has no rope_scaling block)"
        )
    eos = cfg.get("eos_token_id", 1)
    if isinstance(eos, list):
        eos = eos[0]
    return ModelArch(
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        first_k_dense=cfg.get("first_k_dense_replace", 0),
        ffn_hidden_size=cfg["intermediate_size"],
        moe_ffn_hidden_size=cfg["moe_intermediate_size"],
        num_experts=cfg["n_routed_experts"],
        moe_router_topk=cfg["num_experts_per_tok"],
        num_shared_experts=cfg.get("n_shared_experts") or 0,
        num_attention_heads=cfg["num_attention_heads"],
        q_lora_rank=cfg.get("q_lora_rank"),
        kv_lora_rank=cfg["kv_lora_rank"],
        qk_head_dim=cfg["qk_nope_head_dim"],
        qk_pos_emb_head_dim=cfg["qk_rope_head_dim"],
        v_head_dim=cfg["v_head_dim"],
        vocab_size=cfg["vocab_size"],
        rotary_base=theta,
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        mtp_num_layers=cfg.get("num_nextn_predict_layers") or 0,
        bos_token_id=cfg.get("bos_token_id", 0),
        eos_token_id=eos,
        init_method_std=cfg.get("initializer_range", 0.006),
    )


def _check_exportable(arch: ModelArch) -> None:
    expected = [0] * arch.first_k_dense + [1] * (arch.num_layers - arch.first_k_dense)
    if list(arch.moe_layer_freq) != expected:
        raise ConversionError(
            f"moe_layer_freq={arch.moe_layer_freq} cannot be written as DeepseekV3's "
            f"first_k_dense_replace={arch.first_k_dense} (dense layers must lead, MoE after)"
        )


def arch_to_hf_config(
    arch: ModelArch,
    *,
    model_type: str = "deepseek_v3",
    include_mtp: bool = True,
    dtype: str = "bfloat16",
) -> dict[str, Any]:
    """A ``config.json`` that loads in ``transformers.DeepseekV3ForCausalLM`` and in vLLM/SGLang."""
    if model_type not in MODEL_TYPES:
        raise ConversionError(f"--model-type must be one of {MODEL_TYPES}, got {model_type!r}")
    _check_exportable(arch)
    return {
        "architectures": [ARCHITECTURE],
        "model_type": model_type,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": arch.bos_token_id,
        "eos_token_id": arch.eos_token_id,
        "ep_size": 1,
        "first_k_dense_replace": arch.first_k_dense,
        "hidden_act": "silu",
        "hidden_size": arch.hidden_size,
        "initializer_range": arch.init_method_std,
        "intermediate_size": arch.ffn_hidden_size,
        "kv_lora_rank": arch.kv_lora_rank,
        "max_position_embeddings": arch.max_position_embeddings,
        "moe_intermediate_size": arch.moe_ffn_hidden_size,
        "moe_layer_freq": 1,
        "n_group": 1,
        "n_routed_experts": arch.num_experts,
        "n_shared_experts": arch.num_shared_experts,
        "norm_topk_prob": True,
        "num_attention_heads": arch.num_attention_heads,
        "num_experts_per_tok": arch.moe_router_topk,
        "num_hidden_layers": arch.num_layers,
        "num_key_value_heads": arch.num_attention_heads,
        "num_nextn_predict_layers": arch.mtp_num_layers if include_mtp else 0,
        "q_lora_rank": arch.q_lora_rank,
        "qk_nope_head_dim": arch.qk_head_dim,
        "qk_rope_head_dim": arch.qk_pos_emb_head_dim,
        "rms_norm_eps": arch.rms_norm_eps,
        # DeepSeek stores q_pe/k_pe rows in interleaved pairs; transformers, vLLM and SGLang expect
        # that layout, and Megatron's MLA rotary de-interleaves the same way (see mapping.py).
        "rope_interleave": True,
        "rope_scaling": None,
        "rope_theta": arch.rotary_base,
        "routed_scaling_factor": arch.routed_scaling_factor,
        "scoring_func": "sigmoid",
        "tie_word_embeddings": False,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "torch_dtype": dtype,
        "use_cache": True,
        "v_head_dim": arch.v_head_dim,
        "vocab_size": arch.vocab_size,
    }


def generation_config(arch: ModelArch) -> dict[str, Any]:
    return {"_from_model_config": True, "bos_token_id": arch.bos_token_id, "eos_token_id": arch.eos_token_id}


def write_tokenizer_files(tokenizer: str | os.PathLike | None, arch: ModelArch, out: Path) -> list[str]:
    """The tokenizer's files and ``generation_config.json`` of an export; returns the names copied.

    The tokenizer directory's own ``generation_config.json`` wins; without one the architecture's
    (:func:`generation_config`) is written.
    """
    copied = copy_tokenizer_files(tokenizer, out)
    src = Path(tokenizer or "") / "generation_config.json"
    if tokenizer and src.is_file():
        shutil.copy2(src, out / "generation_config.json")
    else:
        (out / "generation_config.json").write_text(json.dumps(generation_config(arch), indent=2) + "\n")
    return copied
