"""``verify``: NaN-fill coverage catches each way a conversion can go wrong; the CLI end to end."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from joyai_megatron.checksums import MANIFEST
from joyai_megatron.convert import ConversionError
from joyai_megatron.convert.dist_ckpt import DistCkptReader, TensorInfo
from joyai_megatron.convert.hf_io import HFCheckpoint
from joyai_megatron.convert.mapping import mapping_table
from joyai_megatron.convert.verify import check_coverage, verify
from joyai_megatron.model.presets import recipe_arch
from joyai_megatron.training.checkpoint_model import load_checkpoint_recipe
from joyai_megatron.training.checkpoint_scan import CheckpointError
from tests.convert.convert_helpers import hf_tensors


@pytest.fixture()
def parts(tiny_ckpt, tiny_export):
    reader = DistCkptReader(tiny_ckpt)
    table = mapping_table(recipe_arch(load_checkpoint_recipe(reader.path)))
    return reader, HFCheckpoint(tiny_export), table


def test_verify_passes_on_both_sides_of_a_conversion(tiny_ckpt, tiny_export, tiny_hf):
    report = verify(tiny_ckpt, tiny_export, progress=False)
    assert report.tensors == len(hf_tensors(tiny_export))
    verify(tiny_ckpt, tiny_hf, progress=False)


def test_tampered_export_is_caught(work, tiny_ckpt, tiny_export):
    bad = work / "export_tampered"
    shutil.copytree(tiny_export, bad)
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    shard = bad / HFCheckpoint(bad).weight_map[name]
    tensors = load_file(shard)
    tensors[name][3, 7] += 1e-3
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{shard.name}\): (contents changed|truncated|longer)"):
        verify(tiny_ckpt, bad, progress=False)  # the export's checksums.json catches it first
    (bad / MANIFEST).unlink()  # without one, the tensor comparison still does
    with pytest.raises(ConversionError, match=rf"{name}: values differ"):
        verify(tiny_ckpt, bad, progress=False)


def test_double_write_and_swaps_are_caught(parts, monkeypatch):
    reader, hf, table = parts
    rows = table.by_megatron
    ln, post = (
        rows["decoder.layers.1.input_layernorm.weight"],
        rows["decoder.layers.1.pre_mlp_layernorm.weight"],
    )
    # Two Megatron tensors mapped onto one HF tensor: the second write finds it no longer NaN.
    monkeypatch.setitem(rows, ln.megatron, dataclasses.replace(ln, hf=post.hf))
    with pytest.raises(
        ConversionError, match=r"model.layers.1.post_attention_layernorm.weight written twice"
    ):
        check_coverage(reader, hf, table, progress=False)
    # Swapped but each written once: caught by the bitwise comparison with the file.
    monkeypatch.setitem(rows, post.megatron, dataclasses.replace(post, hf=ln.hf))
    with pytest.raises(ConversionError, match=r"model.layers.1.input_layernorm.weight: values differ"):
        check_coverage(reader, hf, table, progress=False)


def test_unwritten_and_unused_tensors_are_caught(parts, monkeypatch):
    reader, hf, table = parts
    real_read = DistCkptReader.read

    def read_with_a_hole(self, key, offsets=None, sizes=None):
        out = real_read(self, key, offsets, sizes)
        if key == "decoder.layers.2.mlp.router.expert_bias":
            out[3] = float("nan")
        return out

    monkeypatch.setattr(DistCkptReader, "read", read_with_a_hole)
    with pytest.raises(
        ConversionError, match=r"model.layers.2.mlp.gate.e_score_correction_bias: never written"
    ):
        check_coverage(reader, hf, table, progress=False)
    monkeypatch.setattr(DistCkptReader, "read", real_read)

    monkeypatch.setitem(reader.tensors, "decoder.layers.1.mlp.extra_scale", TensorInfo((64,), torch.float32))
    with pytest.raises(
        ConversionError, match=r"decoder.layers.1.mlp.extra_scale: the checkpoint has shape \[64\]"
    ):
        check_coverage(reader, hf, table, progress=False)


def test_cli_end_to_end(work, tiny_hf):
    """The documented commands, as a user types them (``__main__`` guard, exit codes, messages)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}

    def cli(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "joyai_megatron.convert", *args, "--no-progress"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)

    meg, out = work / "cli_megatron", work / "cli_export"
    r = cli("from-hf", "--hf", str(tiny_hf), "--output", str(meg))
    assert r.returncode == 0, r.stderr
    r = cli("to-hf", "--checkpoint", str(meg), "--output", str(out), "--model-type", "joyai_llm_flash")
    assert r.returncode == 0 and "GiB/s" in r.stdout, r.stderr
    r = cli("verify", "--checkpoint", str(meg / "iter_0000000"), "--hf", str(tiny_hf), "--logits")
    assert r.returncode == 0, r.stderr
    assert "greedy generations identical" in r.stdout
    diff = float(r.stdout.split("max |logit diff| ")[1].split(",")[0])
    assert diff <= 1e-4
    r = cli("to-hf", "--checkpoint", str(meg), "--output", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr
