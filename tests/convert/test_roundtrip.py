"""HF -> Megatron -> HF is the identity, and the import is what Megatron itself would save."""

from __future__ import annotations

import json

import pytest
import torch

from joyai_megatron.convert.dist_ckpt import DistCkptReader
from joyai_megatron.convert.from_hf import import_from_hf
from joyai_megatron.convert.to_hf import export_to_hf
from tests.convert.convert_helpers import assert_same_tensors, hf_tensors, make_tiny_hf, save_with_megatron


def _config(path):
    from transformers import DeepseekV3Config

    cfg = DeepseekV3Config.from_pretrained(path).to_dict()
    cfg.pop("transformers_version", None)
    return cfg


def test_round_trip_is_bitwise_with_identical_config(tiny_hf, tiny_export):
    assert_same_tensors(hf_tensors(tiny_hf), hf_tensors(tiny_export))
    assert _config(tiny_hf) == _config(tiny_export)
    index = json.loads((tiny_export / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded, with a consistent index
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in hf_tensors(tiny_export).values()
    )


def test_bf16_round_trip_and_dtype_cast(work):
    src = make_tiny_hf(work / "hf_bf16", seed=3, dtype=torch.bfloat16)
    import_from_hf(src, work / "meg_bf16", progress=False)
    stored = DistCkptReader(work / "meg_bf16").tensors
    assert stored["decoder.layers.1.mlp.router.expert_bias"].dtype == torch.float32
    assert stored["decoder.layers.1.mlp.router.weight"].dtype == torch.bfloat16
    export_to_hf(work / "meg_bf16", work / "out_bf16", progress=False)
    assert_same_tensors(hf_tensors(src), hf_tensors(work / "out_bf16"))
    assert json.loads((work / "out_bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"

    export_to_hf(work / "meg_bf16", work / "out_fp32", dtype="fp32", progress=False)
    cast = hf_tensors(work / "out_fp32")
    assert cast["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in cast.values())
    assert torch.equal(cast["lm_head.weight"], hf_tensors(src)["lm_head.weight"].float())


def test_import_matches_megatrons_own_save(work, tiny_ckpt, megatron_model):
    """Same keys, shapes and objects as dist_checkpointing.save of our model (both backends save
    Transformer Engine's fused norm names)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint import FileSystemReader

    model, _ = megatron_model
    save_with_megatron(model, work / "megatron_own")
    theirs = FileSystemReader(work / "megatron_own").read_metadata().state_dict_metadata
    ours = FileSystemReader(tiny_ckpt / "iter_0000000").read_metadata().state_dict_metadata
    assert sorted(theirs) == sorted(ours)
    assert any(k.endswith("linear_q_up_proj.layer_norm_weight") for k in ours)
    for key, md in theirs.items():
        assert type(md) is type(ours[key]), key
        if hasattr(md, "size"):
            assert md.size == ours[key].size and md.properties.dtype == ours[key].properties.dtype, key
    # Megatron's naming: "unexpected" = asked for by the model but absent from the checkpoint,
    # "missing" = in the checkpoint but not asked for.
    _, not_asked_for, absent = dist_checkpointing.load(
        {"model": model.sharded_state_dict()}, str(tiny_ckpt / "iter_0000000"), strict="return_all"
    )
    assert not absent and not not_asked_for, (absent, not_asked_for)
    assert (tiny_ckpt / "latest_checkpointed_iteration.txt").read_text() == "0"


@pytest.mark.parametrize("names", ["local", "te"])
def test_either_backends_norm_names_export_the_same(work, tiny_hf, names):
    import_from_hf(tiny_hf, work / f"meg_{names}", names=names, progress=False)
    keys = set(DistCkptReader(work / f"meg_{names}").tensors)
    te_key = "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"
    assert (te_key in keys) == (names == "te")
    assert ("decoder.layers.0.pre_mlp_layernorm.weight" in keys) == (names == "local")
    export_to_hf(work / f"meg_{names}", work / f"out_{names}", progress=False)
    assert_same_tensors(hf_tensors(tiny_hf), hf_tensors(work / f"out_{names}"))


def test_no_mtp_either_way(work, tiny_ckpt, tiny_hf):
    export_to_hf(tiny_ckpt, work / "out_nomtp", include_mtp=False, progress=False)
    cfg = json.loads((work / "out_nomtp" / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 0
    mtp = f"model.layers.{cfg['num_hidden_layers']}."
    without_mtp = {n: t for n, t in hf_tensors(tiny_hf).items() if not n.startswith(mtp)}
    assert_same_tensors(without_mtp, hf_tensors(work / "out_nomtp"))

    import_from_hf(tiny_hf, work / "meg_nomtp", include_mtp=False, progress=False)
    assert not [k for k in DistCkptReader(work / "meg_nomtp").tensors if k.startswith("mtp.")]
    export_to_hf(work / "meg_nomtp", work / "out_nomtp2", progress=False)
    assert_same_tensors(without_mtp, hf_tensors(work / "out_nomtp2"))
