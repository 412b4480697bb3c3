"""The mapping table against the two real models it describes, and the per-tensor API."""

from __future__ import annotations

import pytest
import torch

from joyai_megatron.convert import (
    ConversionError,
    canonical_name,
    hf_names_for,
    hf_to_megatron,
    megatron_to_hf,
)
from joyai_megatron.convert.hf_config import arch_from_hf_config, arch_to_hf_config
from joyai_megatron.convert.live import canonical_named_tensors
from joyai_megatron.convert.mapping import mapping_table
from tests.convert.convert_helpers import TINY_HF_CONFIG, hf_tensors, tiny_config


def test_hf_side_is_exactly_transformers_names_plus_mtp(tiny_hf):
    arch = arch_from_hf_config(tiny_config().to_dict())
    table = mapping_table(arch)
    stored = {n: tuple(t.shape) for n, t in hf_tensors(tiny_hf).items()}
    assert table.hf_shapes(with_copies=True) == stored

    from transformers import DeepseekV3ForCausalLM

    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(tiny_config())
    # transformers 5 fuses experts in memory; its checkpoint names are the per-expert ones above.
    mtp = f"model.layers.{arch.num_layers}."
    non_mtp = {n for n in stored if not n.startswith(mtp) and ".mlp.experts." not in n}
    in_memory = {n for n in model.state_dict() if ".mlp.experts." not in n}
    assert non_mtp == in_memory


def test_megatron_side_is_exactly_our_models_parameters(megatron_model):
    model, arch = megatron_model
    table = mapping_table(arch)
    live = {n: tuple(t.shape) for n, t in canonical_named_tensors(model)}
    expected = {row.megatron: row.megatron_shape for row in table.rows}
    assert live == expected


def test_per_tensor_api_is_a_bijection():
    arch = arch_from_hf_config(tiny_config().to_dict())
    table = mapping_table(arch)
    seen: dict[str, str] = {}
    for row in table.rows:
        tensor = torch.randn(row.megatron_shape)
        pairs = megatron_to_hf(row.megatron, tensor, arch)
        for hf_name, part in pairs:
            assert hf_name not in seen, f"{hf_name} produced by {seen.get(hf_name)} and {row.megatron}"
            seen[hf_name] = row.megatron
            assert (
                part.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
            )  # views, no copies
        back = hf_to_megatron(row.megatron, dict(pairs), arch)
        assert torch.equal(back, tensor)
        assert hf_names_for(row.megatron, arch) == row.hf
        for alias in row.aliases:
            assert [n for n, _ in megatron_to_hf(alias, tensor, arch)] == [n for n, _ in pairs]
    assert set(seen) == set(table.hf_shapes(with_copies=True))


def test_swiglu_fc1_is_gate_then_up():
    arch = arch_from_hf_config(tiny_config().to_dict())
    fc1 = torch.arange(2 * 32 * 64, dtype=torch.float32).reshape(64, 64)
    (gate_name, gate), (up_name, up) = megatron_to_hf(
        "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight", fc1, arch
    )
    assert gate_name == "model.layers.1.mlp.experts.3.gate_proj.weight"
    assert up_name == "model.layers.1.mlp.experts.3.up_proj.weight"
    assert torch.equal(gate, fc1[:32]) and torch.equal(up, fc1[32:])


def test_other_megatron_spellings_and_errors():
    arch = arch_from_hf_config(tiny_config().to_dict())
    assert canonical_name("decoder.layers.2.mlp.experts.linear_fc2.weight5") == (
        "decoder.layers.2.mlp.experts.local_experts.5.linear_fc2.weight"
    )
    assert canonical_name("mtp.layers.0.transformer_layer.input_layernorm.weight") == (
        "mtp.layers.0.mtp_model_layer.input_layernorm.weight"
    )
    with pytest.raises(ConversionError, match=r"decoder.layers.9.input_layernorm.weight"):
        megatron_to_hf("decoder.layers.9.input_layernorm.weight", torch.zeros(64), arch)
    with pytest.raises(ConversionError, match=r"shape \[32\] does not match the architecture's \[64\]"):
        megatron_to_hf("decoder.final_layernorm.weight", torch.zeros(32), arch)


def test_config_round_trip_and_refusals():
    arch = arch_from_hf_config(tiny_config().to_dict())
    assert arch_from_hf_config(arch_to_hf_config(arch)) == arch
    joyai = {**arch_to_hf_config(arch), "model_type": "joyai_llm_flash"}
    assert arch_from_hf_config(joyai) == arch
    legacy = {**TINY_HF_CONFIG, "model_type": "deepseek_v3"}
    assert arch_from_hf_config(legacy) == arch
    for bad, match in [
        ({"n_group": 4}, "n_group"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"rope_scaling": {"type": "yarn", "factor": 40}}, "yarn"),
        ({"model_type": "llama"}, "model_type"),
    ]:
        with pytest.raises(ConversionError, match=match):
            arch_from_hf_config({**legacy, **bad})
