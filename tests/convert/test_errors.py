"""Mismatches fail before writing and name the tensor; interrupted conversions leave no output."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from joyai_megatron.convert import ConversionError
from joyai_megatron.convert.from_hf import import_from_hf
from joyai_megatron.convert.to_hf import export_to_hf
from tests.convert.convert_helpers import make_tiny_hf

# An edit of config.json (import) or of the recipe's arch (export) -> the first offending tensor, in
# model order, with both shapes.
HF_SAYS = r"{}: the HF checkpoint has shape \[{}\], config\.json {}implies {}"
CKPT_SAYS = r"{}: the checkpoint has {}, the recipe's architecture implies shape \[{}\]"
HF_MISMATCHES = {
    "experts": ({"n_routed_experts": 16}, HF_SAYS.format(r"model\.layers\.1\.mlp\.gate\.weight", "8, 64", ".* ", r"shape \[16, 64\]")),
    "hidden": ({"hidden_size": 128}, HF_SAYS.format(r"model\.embed_tokens\.weight", "512, 64", ".* ", r"shape \[512, 128\]")),
    "vocab": ({"vocab_size": 1024}, HF_SAYS.format(r"model\.embed_tokens\.weight", "512, 64", ".* ", r"shape \[1024, 64\]")),
    "layers": ({"num_hidden_layers": 3}, HF_SAYS.format(r"model\.layers\.4\.\S+", r"\d+(, \d+)?", r"\(3 layers \+ 1 MTP.*", "no such tensor")),
}
CKPT_MISMATCHES = {
    "experts": ({"num_experts": 16}, CKPT_SAYS.format(r"decoder\.layers\.1\.mlp\.router\.weight", r"shape \[8, 64\]", "16, 64")),
    "hidden": ({"hidden_size": 128}, CKPT_SAYS.format(r"embedding\.word_embeddings\.weight", r"shape \[512, 64\]", "512, 128")),
    "vocab": ({"vocab_size": 1024}, CKPT_SAYS.format(r"embedding\.word_embeddings\.weight", r"shape \[512, 64\]", "1024, 64")),
    "layers": ({"num_layers": 5}, CKPT_SAYS.format(r"decoder\.layers\.4\.input_layernorm\.weight", "no such tensor", "64")),
}  # fmt: skip


@pytest.mark.parametrize("what", sorted(HF_MISMATCHES))
def test_config_json_mismatch_fails_before_writing(work, tiny_hf, what):
    edit, message = HF_MISMATCHES[what]
    src = work / f"hf_bad_{what}"
    shutil.copytree(tiny_hf, src, dirs_exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(ConversionError, match=message):
        import_from_hf(src, work / f"meg_bad_{what}", progress=False)
    assert not list(work.glob(f"meg_bad_{what}*"))


@pytest.mark.parametrize("what", sorted(CKPT_MISMATCHES))
def test_recipe_mismatch_fails_before_writing(work, tiny_ckpt, what):
    edit, message = CKPT_MISMATCHES[what]
    ckpt = work / f"meg_recipe_{what}"
    shutil.copytree(tiny_ckpt, ckpt, dirs_exist_ok=True)
    recipe_path = ckpt / "iter_0000000" / "recipe.yaml"
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["model"]["arch"].update(edit)
    recipe["model"]["arch"]["moe_layer_freq"] = []  # recomputed from num_layers / first_k_dense
    recipe_path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConversionError, match=message):
        export_to_hf(ckpt, work / f"out_bad_{what}", progress=False)
    assert not list(work.glob(f"out_bad_{what}*"))


def test_missing_mtp_weights_point_to_no_mtp(work):
    src = make_tiny_hf(work / "hf_without_mtp", mtp=False)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 1}))
    with pytest.raises(ConversionError, match=r"no model\.layers\.4\.\* \(MTP\) tensors; pass --no-mtp"):
        import_from_hf(src, work / "meg_without_mtp", progress=False)
    import_from_hf(src, work / "meg_without_mtp", include_mtp=False, progress=False)


def test_interrupted_export_and_import_leave_nothing(work, tiny_ckpt, tiny_hf, monkeypatch):
    from joyai_megatron.convert import from_hf, hf_io

    real_shard = hf_io._write_shard
    calls = []

    def shard_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated Ctrl-C in the middle of the export")
        return real_shard(*args, **kwargs)

    monkeypatch.setattr(hf_io, "_write_shard", shard_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_to_hf(tiny_ckpt, work / "out_interrupted", max_shard_bytes=200_000, threads=1, progress=False)
    assert not list(work.glob("out_interrupted*"))

    def fail_midway(path, chunks, objects, **kwargs):
        Path(path).mkdir(parents=True)
        (Path(path) / "__0_0.distcp").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(from_hf, "write_dist_checkpoint", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        import_from_hf(tiny_hf, work / "meg_interrupted", progress=False)
    assert not list(work.glob("meg_interrupted*"))


def test_sigterm_during_export_leaves_nothing(work, tiny_ckpt):
    """A scheduler's SIGTERM mid-export: the CLI cleans up its temporary directory and exits."""
    out = work / "out_sigterm"
    script = (  # reading each tensor takes 0.3 s, so the export is still running when SIGTERM comes
        "import sys, time\n"
        "from joyai_megatron.convert.dist_ckpt import DistCkptReader\n"
        "from joyai_megatron.convert.__main__ import main\n"
        "real = DistCkptReader.read\n"
        "def slow(*a, **k):\n"
        "    print('WRITING', flush=True); time.sleep(0.3); return real(*a, **k)\n"
        "DistCkptReader.read = slow\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = ["to-hf", "--checkpoint", str(tiny_ckpt), "--output", str(out), "--threads", "1", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "WRITING"
    assert list(work.glob("out_sigterm.tmp-*"))
    os.kill(proc.pid, signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    # The export had ~140 tensors to go; the writer stops after the one it is reading.
    assert rest.count("WRITING") <= 2, rest
    assert not list(work.glob("out_sigterm*"))


def test_existing_output_needs_overwrite(work, tiny_ckpt):
    out = work / "out_exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists"):
        export_to_hf(tiny_ckpt, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only what the tool wrote: a directory without its marker stays
    with pytest.raises(ConversionError, match="refusing to overwrite"):
        export_to_hf(tiny_ckpt, out, overwrite=True, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    export_to_hf(tiny_ckpt, out, overwrite=True, progress=False)  # empty: fine
    (out / "stale.txt").write_text("from the first export")
    export_to_hf(tiny_ckpt, out, overwrite=True, progress=False)  # an earlier export: replaced
    assert (out / "config.json").is_file() and not (out / "stale.txt").exists()
    assert sorted(p.name for p in work.glob("out_exists*")) == ["out_exists"]
