"""Model shapes: the JoyAI-LLM Flash architecture and its smaller stand-ins.

A preset holds only architecture (what a Hugging Face ``config.json`` would hold). Parallel layout,
precision and the kernel backend live in the recipe, so one preset serves every layout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from joyai_megatron.config.schema import Recipe


@dataclass(frozen=True)
class ModelArch:
    """DeepSeek-V3-style MoE with MLA and a dense multi-token-prediction block.

    Field names follow the spec's ``config.json`` where one exists, so conversion needs no
    renaming table for the shapes.
    """

    hidden_size: int
    num_layers: int
    first_k_dense: int  # leading dense layers (JoyAI: layer 0 only)
    ffn_hidden_size: int  # dense FFN width, also the MTP block's FFN width
    moe_ffn_hidden_size: int
    num_experts: int
    moe_router_topk: int
    num_shared_experts: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_head_dim: int  # HF qk_nope_head_dim
    qk_pos_emb_head_dim: int  # HF qk_rope_head_dim
    v_head_dim: int
    vocab_size: int
    rotary_base: float = 3.2e7
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    routed_scaling_factor: float = 2.5
    mtp_num_layers: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 1
    init_method_std: float = 0.006
    moe_layer_freq: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.moe_layer_freq:
            pattern = [0] * self.first_k_dense + [1] * (self.num_layers - self.first_k_dense)
            object.__setattr__(self, "moe_layer_freq", pattern)
        if len(self.moe_layer_freq) != self.num_layers:
            raise ValueError(
                f"moe_layer_freq has {len(self.moe_layer_freq)} entries but num_layers={self.num_layers}"
            )

    @property
    def shared_expert_hidden_size(self) -> int:
        return self.num_shared_experts * self.moe_ffn_hidden_size

    def replace(self, **changes: object) -> ModelArch:
        if "num_layers" in changes or "first_k_dense" in changes:
            changes.setdefault("moe_layer_freq", [])
        return dataclasses.replace(self, **changes)


JOYAI_48B_A3B = ModelArch(
    hidden_size=2048,
    num_layers=40,
    first_k_dense=1,
    ffn_hidden_size=7168,
    moe_ffn_hidden_size=768,
    num_experts=256,
    moe_router_topk=8,
    num_shared_experts=1,
    num_attention_heads=32,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_head_dim=128,
    qk_pos_emb_head_dim=64,
    v_head_dim=128,
    vocab_size=129280,
)

# Real per-layer shapes (width, MLA ranks, expert width, top-8 of many experts) with 6 layers and 64
# experts: 2.27B parameters (+79M MTP), which trains in bf16 with Muon on one 80 GB GPU for throughput work.
JOYAI_PROXY_1GPU = JOYAI_48B_A3B.replace(num_layers=6, num_experts=64)

# Same structure (dense first layer, MoE with shared expert, MLA with q-LoRA, dense MTP) at toy
# width, for CPU tests and the demo; the vocabulary matches the bundled demo tokenizer (8192).
TINY = ModelArch(
    hidden_size=64,
    num_layers=3,
    first_k_dense=1,
    ffn_hidden_size=128,
    moe_ffn_hidden_size=32,
    num_experts=8,
    moe_router_topk=2,
    num_shared_experts=1,
    num_attention_heads=4,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_head_dim=16,
    qk_pos_emb_head_dim=8,
    v_head_dim=16,
    vocab_size=8192,
    rotary_base=10000.0,
    max_position_embeddings=4096,
    init_method_std=0.02,
)

PRESETS: dict[str, ModelArch] = {
    "joyai_48b_a3b": JOYAI_48B_A3B,
    "joyai_proxy_1gpu": JOYAI_PROXY_1GPU,
    "tiny": TINY,
}


def get_preset(name: str) -> ModelArch:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None


def arch_from_dict(values: dict) -> ModelArch:
    """Build an architecture from a preset name plus overrides (the recipe's ``model.arch``)."""
    values = dict(values)
    base = get_preset(values.pop("preset")) if "preset" in values else None
    known = {f.name for f in dataclasses.fields(ModelArch)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise KeyError(f"unknown model architecture keys {unknown}; known: {sorted(known)}")
    if base is None:
        return ModelArch(**values)
    return base.replace(**values) if values else base


def recipe_arch(recipe: Recipe) -> ModelArch:
    """The architecture a recipe's model has: its preset with the ``model.arch`` overrides, and the
    MTP block only when ``model.mtp_enabled`` (``mtp_num_layers`` 0 otherwise), so training, plan,
    conversion, merge and evaluation agree on what was built."""
    arch = arch_from_dict({"preset": recipe.model.preset, **dict(recipe.model.arch)})
    if not recipe.model.mtp_enabled and arch.mtp_num_layers:
        arch = arch.replace(mtp_num_layers=0)
    return arch
