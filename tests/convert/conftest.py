"""Shared tiny checkpoints for the conversion tests (built once per session, a few MB each)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.convert.convert_helpers import make_tiny_hf


@pytest.fixture(scope="session")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="session")
def tiny_hf(work: Path) -> Path:
    """The source: random DeepseekV3ForCausalLM (fp32) plus its dense MTP layer, two shards."""
    return make_tiny_hf(work / "hf")


@pytest.fixture(scope="session")
def tiny_ckpt(work: Path, tiny_hf: Path) -> Path:
    from joyai_megatron.convert.from_hf import import_from_hf

    import_from_hf(tiny_hf, work / "megatron", progress=False)
    return work / "megatron"


@pytest.fixture(scope="session")
def tiny_export(work: Path, tiny_ckpt: Path) -> Path:
    from joyai_megatron.convert.to_hf import export_to_hf

    export_to_hf(tiny_ckpt, work / "export", max_shard_bytes=400_000, progress=False)
    return work / "export"


@pytest.fixture(scope="session")
def megatron_model(tiny_ckpt: Path):
    """Our Megatron GPTModel (local backend, fp32) loaded by Megatron's own checkpoint loader."""
    from joyai_megatron.model.presets import recipe_arch
    from joyai_megatron.training.checkpoint import load_model_weights
    from joyai_megatron.training.checkpoint_model import (
        build_megatron_model,
        init_single_process,
        load_checkpoint_recipe,
    )

    init_single_process()
    arch = recipe_arch(load_checkpoint_recipe(tiny_ckpt / "iter_0000000"))
    model = build_megatron_model(arch)
    load_model_weights(model, tiny_ckpt / "iter_0000000")
    return model.eval(), arch


@pytest.fixture(scope="session")
def hf_model(tiny_export: Path):
    from transformers import DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM.from_pretrained(tiny_export, dtype=torch.float32).eval()
