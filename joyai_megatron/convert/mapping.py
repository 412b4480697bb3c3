"""The one Megatron <-> Hugging Face (DeepseekV3 layout) table.

Every converter, the verification and the RL weight sync read this table, so a naming or layout
fact lives here once.  A row (:class:`TensorMap`) says: the Megatron parameter ``megatron`` is the
HF tensors ``hf`` concatenated along dim 0.  One HF part is a plain rename; two parts are SwiGLU's
``linear_fc1`` = [gate_proj; up_proj].  No other transform is needed, because the layouts agree:

* MLA: ``linear_kv_down_proj`` rows are [latent (kv_lora_rank); k_pe (qk_rope_head_dim)] like
  ``kv_a_proj_with_mqa``; ``linear_q_up_proj``/``linear_kv_up_proj`` rows are per head
  [nope; pe] and [k_nope; v] like ``q_b_proj``/``kv_b_proj``.  Megatron applies MLA RoPE with
  ``mla_rotary_interleaved`` (even/odd pairs), which is transformers' ``rope_interleave=True`` and
  DeepSeek's own layout, so q_pe/k_pe rows are not permuted.
* MTP: Megatron's ``eh_proj`` input is cat[enorm(embedding of t+1), hnorm(h_t)], DeepSeek's order.
* Names: the Megatron side uses *canonical* parameter names, i.e. global layer and expert
  indices, per-expert ``local_experts.E`` (TE's grouped ``experts.linear_fc1.weightE`` and the
  checkpoint's stacked ``experts.experts.linear_fc1.weight`` are translated by
  :func:`canonical_name` / :mod:`joyai_megatron.convert.dist_ckpt`), and the ``local`` backend's
  norm names with the TE backend's fused ``layer_norm_weight`` names as ``aliases``.

The MTP block goes to HF layer ``num_hidden_layers + m`` with its own ``embed_tokens`` and
``shared_head.head`` ``copies`` of the main embedding and LM head, which vLLM and SGLang load.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

import torch

from joyai_megatron.convert.common import ConversionError, fmt_shape
from joyai_megatron.model.presets import ModelArch

Shape = tuple[int, ...]


@dataclass(frozen=True)
class TensorMap:
    """One Megatron parameter and the HF tensor(s) it is made of."""

    megatron: str
    hf: tuple[str, ...]
    hf_shapes: tuple[Shape, ...]
    aliases: tuple[str, ...] = ()  # the same tensor under the TE backend's fused-norm name
    copies: tuple[str, ...] = ()  # extra HF names that hold the whole tensor again (MTP heads)
    layer: int | None = None  # HF layer index (MTP included), None for top-level tensors

    @property
    def megatron_shape(self) -> Shape:
        if len(self.hf_shapes) == 1:
            return self.hf_shapes[0]
        rows = sum(s[0] for s in self.hf_shapes)
        return (rows, *self.hf_shapes[0][1:])

    @property
    def row_splits(self) -> list[int]:
        return [s[0] for s in self.hf_shapes]


def _attention(arch: ModelArch) -> list[tuple[str, str, Shape, tuple[str, ...]]]:
    """(Megatron suffix, HF suffix, shape, aliases) of one MLA block."""
    h, n = arch.hidden_size, arch.num_attention_heads
    qk = arch.qk_head_dim + arch.qk_pos_emb_head_dim
    rows: list[tuple[str, str, Shape, tuple[str, ...]]] = [
        ("input_layernorm.weight", "input_layernorm.weight", (h,), ()),
    ]
    if arch.q_lora_rank is None:
        rows.append(("self_attention.linear_q_proj.weight", "self_attn.q_proj.weight", (n * qk, h), ()))
    else:
        q = arch.q_lora_rank
        rows += [
            ("self_attention.linear_q_down_proj.weight", "self_attn.q_a_proj.weight", (q, h), ()),
            (
                "self_attention.q_layernorm.weight",
                "self_attn.q_a_layernorm.weight",
                (q,),
                ("self_attention.linear_q_up_proj.layer_norm_weight",),
            ),
            ("self_attention.linear_q_up_proj.weight", "self_attn.q_b_proj.weight", (n * qk, q), ()),
        ]
    kv = arch.kv_lora_rank
    rows += [
        (
            "self_attention.linear_kv_down_proj.weight",
            "self_attn.kv_a_proj_with_mqa.weight",
            (kv + arch.qk_pos_emb_head_dim, h),
            (),
        ),
        (
            "self_attention.kv_layernorm.weight",
            "self_attn.kv_a_layernorm.weight",
            (kv,),
            ("self_attention.linear_kv_up_proj.layer_norm_weight",),
        ),
        (
            "self_attention.linear_kv_up_proj.weight",
            "self_attn.kv_b_proj.weight",
            (n * (arch.qk_head_dim + arch.v_head_dim), kv),
            (),
        ),
        ("self_attention.linear_proj.weight", "self_attn.o_proj.weight", (h, n * arch.v_head_dim), ()),
    ]
    return rows


def _layer(arch: ModelArch, meg: str, hf: str, layer: int, moe: bool) -> list[TensorMap]:
    h = arch.hidden_size
    out = [
        TensorMap(meg + m, (hf + x,), (s,), tuple(meg + a for a in al), layer=layer)
        for m, x, s, al in _attention(arch)
    ]

    def glu(m: str, x: str, width: int) -> list[TensorMap]:
        return [
            TensorMap(
                f"{meg}{m}.linear_fc1.weight",
                (f"{hf}{x}.gate_proj.weight", f"{hf}{x}.up_proj.weight"),
                ((width, h), (width, h)),
                layer=layer,
            ),
            TensorMap(
                f"{meg}{m}.linear_fc2.weight", (f"{hf}{x}.down_proj.weight",), ((h, width),), layer=layer
            ),
        ]

    if not moe:
        out.append(
            TensorMap(
                f"{meg}pre_mlp_layernorm.weight",
                (f"{hf}post_attention_layernorm.weight",),
                ((h,),),
                (f"{meg}mlp.linear_fc1.layer_norm_weight",),
                layer=layer,
            )
        )
        return out + glu("mlp", "mlp", arch.ffn_hidden_size)
    e = arch.num_experts
    out += [
        TensorMap(
            f"{meg}pre_mlp_layernorm.weight", (f"{hf}post_attention_layernorm.weight",), ((h,),), layer=layer
        ),
        TensorMap(f"{meg}mlp.router.weight", (f"{hf}mlp.gate.weight",), ((e, h),), layer=layer),
        TensorMap(
            f"{meg}mlp.router.expert_bias", (f"{hf}mlp.gate.e_score_correction_bias",), ((e,),), layer=layer
        ),
    ]
    for i in range(e):
        out += glu(f"mlp.experts.local_experts.{i}", f"mlp.experts.{i}", arch.moe_ffn_hidden_size)
    if arch.num_shared_experts:
        out += glu("mlp.shared_experts", "mlp.shared_experts", arch.shared_expert_hidden_size)
    return out


def build_table(arch: ModelArch, include_mtp: bool = True) -> list[TensorMap]:
    """All rows in HF order: embedding, layers, final norm, LM head, then the MTP layer(s)."""
    h, v = arch.hidden_size, arch.vocab_size
    n_mtp = arch.mtp_num_layers if include_mtp else 0
    mtp_layers = [arch.num_layers + m for m in range(n_mtp)]
    table = [
        TensorMap(
            "embedding.word_embeddings.weight",
            ("model.embed_tokens.weight",),
            ((v, h),),
            copies=tuple(f"model.layers.{i}.embed_tokens.weight" for i in mtp_layers),
        )
    ]
    for i in range(arch.num_layers):
        table += _layer(arch, f"decoder.layers.{i}.", f"model.layers.{i}.", i, bool(arch.moe_layer_freq[i]))
    table += [
        TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",), ((h,),)),
        TensorMap(
            "output_layer.weight",
            ("lm_head.weight",),
            ((v, h),),
            copies=tuple(f"model.layers.{i}.shared_head.head.weight" for i in mtp_layers),
        ),
    ]
    for m, i in enumerate(mtp_layers):
        meg, hf = f"mtp.layers.{m}.", f"model.layers.{i}."
        table += [
            TensorMap(f"{meg}enorm.weight", (f"{hf}enorm.weight",), ((h,),), layer=i),
            TensorMap(f"{meg}hnorm.weight", (f"{hf}hnorm.weight",), ((h,),), layer=i),
            TensorMap(f"{meg}eh_proj.weight", (f"{hf}eh_proj.weight",), ((h, 2 * h),), layer=i),
        ]
        # JoyAI's MTP block is a dense layer (intermediate_size FFN), not an MoE layer.
        table += _layer(arch, f"{meg}mtp_model_layer.", hf, i, moe=False)
        table.append(
            TensorMap(f"{meg}final_layernorm.weight", (f"{hf}shared_head.norm.weight",), ((h,),), layer=i)
        )
    return table


class MappingTable:
    """Lookups over :func:`build_table` for one architecture."""

    def __init__(self, arch: ModelArch, include_mtp: bool = True) -> None:
        self.arch = arch
        self.include_mtp = include_mtp
        self.rows = build_table(arch, include_mtp)
        self.by_megatron: dict[str, TensorMap] = {}
        self.by_hf: dict[str, tuple[TensorMap, int]] = {}
        self.copy_of: dict[str, TensorMap] = {}
        for row in self.rows:
            for name in (row.megatron, *row.aliases):
                self.by_megatron[name] = row
            for part, name in enumerate(row.hf):
                self.by_hf[name] = (row, part)
            for name in row.copies:
                self.copy_of[name] = row

    def hf_shapes(self, with_copies: bool = True) -> dict[str, Shape]:
        """Every HF tensor name and shape, in table order."""
        out: dict[str, Shape] = {}
        for row in self.rows:
            out.update(zip(row.hf, row.hf_shapes, strict=True))
            if with_copies:
                out.update((c, row.megatron_shape) for c in row.copies)
        return out

    def row(self, megatron_name: str) -> TensorMap:
        name = canonical_name(megatron_name)
        try:
            return self.by_megatron[name]
        except KeyError:
            raise ConversionError(
                f"no HF mapping for Megatron tensor {megatron_name!r} (architecture: {self.arch.num_layers} "
                f"layers, {self.arch.num_experts} experts, mtp_num_layers={self.arch.mtp_num_layers if self.include_mtp else 0})"
            ) from None


_TABLES: dict[tuple[str, bool], MappingTable] = {}


def mapping_table(arch: ModelArch, include_mtp: bool = True) -> MappingTable:
    """Cached :class:`MappingTable` (the weight sync calls per tensor; building once matters)."""
    key = (json.dumps(dataclasses.asdict(arch), sort_keys=True), include_mtp)
    if key not in _TABLES:
        _TABLES[key] = MappingTable(arch, include_mtp)
    return _TABLES[key]


_GROUPED = re.compile(r"^(.*\.mlp\.experts)\.(linear_fc[12])\.weight(\d+)$")


def canonical_name(name: str) -> str:
    """Accept the other spellings of a parameter that Megatron uses and return the table's.

    TE grouped GEMM ``mlp.experts.linear_fc1.weight7`` -> ``mlp.experts.local_experts.7.linear_fc1.weight``
    (the index must already be global), and the checkpoint's MTP ``transformer_layer`` -> ``mtp_model_layer``.
    """
    m = _GROUPED.match(name)
    if m:
        name = f"{m.group(1)}.local_experts.{m.group(3)}.{m.group(2)}.weight"
    if name.startswith("mtp.layers."):
        name = name.replace(".transformer_layer.", ".mtp_model_layer.", 1)
    return name


def megatron_to_hf(
    name: str, tensor: torch.Tensor, arch: ModelArch, include_mtp: bool = True
) -> list[tuple[str, torch.Tensor]]:
    """One full (TP-gathered) Megatron parameter -> its HF tensors (views, no copy).

    ``name`` uses global layer and expert indices (see :func:`canonical_name`).  The MTP copies of
    the embedding and LM head are included when the table has an MTP layer.
    """
    row = mapping_table(arch, include_mtp).row(name)
    if tuple(tensor.shape) != row.megatron_shape:
        raise ConversionError(
            f"{name}: shape {fmt_shape(tensor.shape)} does not match the architecture's {fmt_shape(row.megatron_shape)}"
        )
    parts = torch.split(tensor, row.row_splits, dim=0) if len(row.hf) > 1 else (tensor,)
    out = list(zip(row.hf, parts, strict=True))
    out += [(c, tensor) for c in row.copies]
    return out


def hf_names_for(name: str, arch: ModelArch, include_mtp: bool = True) -> tuple[str, ...]:
    """The HF tensors :func:`hf_to_megatron` needs for Megatron parameter ``name``."""
    return mapping_table(arch, include_mtp).row(name).hf


def hf_to_megatron(
    name: str, hf_tensors: dict[str, torch.Tensor], arch: ModelArch, include_mtp: bool = True
) -> torch.Tensor:
    """Megatron parameter ``name`` assembled from its HF tensors (``hf_names_for(name)``)."""
    row = mapping_table(arch, include_mtp).row(name)
    parts = []
    for hf_name, shape in zip(row.hf, row.hf_shapes, strict=True):
        if hf_name not in hf_tensors:
            raise ConversionError(f"{name} needs HF tensor {hf_name}, which was not given")
        t = hf_tensors[hf_name]
        if tuple(t.shape) != shape:
            raise ConversionError(
                f"{hf_name}: shape {fmt_shape(t.shape)}, expected {fmt_shape(shape)} for {name}"
            )
        parts.append(t)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
