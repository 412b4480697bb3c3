"""``merge``: weighted averages of torch_dist checkpoints, exact in fp32, across saving layouts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from joyai_megatron.cli import main as cli_main
from joyai_megatron.convert.common import ConversionError
from joyai_megatron.convert.dist_ckpt import DistCkptReader
from joyai_megatron.convert.from_hf import import_from_hf
from joyai_megatron.convert.merge import ema_weights, merge_checkpoints, parse_checkpoint_arg
from tests.convert.convert_helpers import make_tiny_hf


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    reader = DistCkptReader(path)
    return {k: reader.read(k) for k in reader.model_keys()}


@pytest.fixture(scope="module")
def other_ckpt(work: Path) -> Path:
    """A second model of the same architecture (another seed), saved at iteration 0."""
    out = work / "merge_other"
    if not out.exists():
        import_from_hf(make_tiny_hf(work / "merge_other_hf", seed=1), out, progress=False)
    return out


def test_one_checkpoint_weight_one_is_bitwise(work: Path, tiny_ckpt: Path, megatron_model) -> None:
    out = work / "merge_one"
    assert cli_main(["merge", "--checkpoint", f"{tiny_ckpt}:1", "--output", str(out), "--no-progress"]) == 0
    src, merged = _tensors(tiny_ckpt), _tensors(out)
    assert sorted(src) == sorted(merged)
    for key, value in src.items():
        assert merged[key].dtype == value.dtype and torch.equal(merged[key], value), key
    # Megatron's own loader takes it (strict: every model tensor and _extra_state is there).
    from joyai_megatron.training.checkpoint import load_model_weights

    model, _ = megatron_model
    load_model_weights(model, out / "iter_0000000")


def test_two_checkpoints_are_a_x_plus_b_y(work: Path, tiny_ckpt: Path, other_ckpt: Path) -> None:
    a, b = 0.3, 0.7
    out = work / "merge_two"
    merge_checkpoints([(tiny_ckpt, a), (other_ckpt, b)], out, progress=False)
    x, y, merged = _tensors(tiny_ckpt), _tensors(other_ckpt), _tensors(out)
    for key in x:
        assert torch.equal(merged[key], a * x[key].float() + b * y[key].float()), key
    assert not torch.equal(merged["embedding.word_embeddings.weight"], x["embedding.word_embeddings.weight"])


def test_mismatched_architectures_name_the_tensor(work: Path, tiny_ckpt: Path) -> None:
    wider = work / "merge_wider"
    import_from_hf(make_tiny_hf(work / "merge_wider_hf", intermediate_size=96), wider, progress=False)
    with pytest.raises(
        ConversionError, match=r"decoder\.layers\.0\.mlp\.linear_fc1\.weight is \[256, 64\].*\[192, 64\]"
    ):
        merge_checkpoints([(tiny_ckpt, None), (wider, None)], work / "merge_bad", progress=False)
    no_mtp = work / "merge_no_mtp"
    import_from_hf(make_tiny_hf(work / "merge_no_mtp_hf", mtp=False), no_mtp, progress=False)
    with pytest.raises(ConversionError, match=r"has no tensor mtp\."):
        merge_checkpoints([(tiny_ckpt, None), (no_mtp, None)], work / "merge_bad", progress=False)
    assert not (work / "merge_bad").exists()


def test_weights_and_arguments() -> None:
    assert parse_checkpoint_arg("runs/a:0.25") == ("runs/a", 0.25)
    assert parse_checkpoint_arg("runs/a") == ("runs/a", None)
    assert parse_checkpoint_arg("/x:y/iter_0000010") == ("/x:y/iter_0000010", None)
    # decay d per step: avg <- d^dt avg + (1 - d^dt) x
    w = ema_weights([100, 200, 300], 0.99)
    d = 0.99**100
    assert w == pytest.approx([d * d, d * (1 - d), 1 - d])
    assert sum(w) == pytest.approx(1.0)


@pytest.mark.multiproc
@pytest.mark.slow
def test_checkpoints_from_other_layouts_merge(work: Path, tiny_ckpt: Path, other_ckpt: Path) -> None:
    """The second model re-saved by 2 processes at TP=2+EP=2 (Megatron's own save) merges with TP=1."""
    torch.save(
        {"ids": torch.ones(1, 4, dtype=torch.long), "logits": torch.zeros(1, 4, 512)}, work / "merge_ref.pt"
    )
    out = work / "merge_layouts"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(Path(__file__).parent / "layout_worker.py"), "--src", str(other_ckpt / "iter_0000000"),
        "--ref", str(work / "merge_ref.pt"), "--out", str(out), "tp2_ep2:2,1,2,1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    resaved = out / "tp2_ep2"
    reader = DistCkptReader(resaved)
    assert any(len(reader.metadata.state_dict_metadata[k].chunks) > 1 for k in reader.model_keys())

    merged = work / "merge_tp2"
    merge_checkpoints([(tiny_ckpt, 0.25), (resaved, 0.75)], merged, progress=False)
    x, y, m = _tensors(tiny_ckpt), _tensors(other_ckpt), _tensors(merged)
    for key in x:
        assert torch.equal(m[key], 0.25 * x[key].float() + 0.75 * y[key].float()), key
    # and the other way round: the output takes the first checkpoint's (TP=2) chunking
    merged_back = work / "merge_tp2_first"
    merge_checkpoints([(resaved, 0.75), (tiny_ckpt, 0.25)], merged_back, progress=False)
    for key, value in _tensors(merged_back).items():
        assert torch.allclose(value, m[key], rtol=0, atol=1e-7), key
