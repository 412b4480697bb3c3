"""QAT stage: recipe checks, ModelOpt fake quantization and export numerics per format, QAT beating
PTQ on a sharp tiny model, bitwise resume with restored quantizer state, and the quantized HF
export reloading with the fake-quantized model's logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from joyai_megatron.config.recipe import load_recipe
from joyai_megatron.convert.common import ConversionError
from joyai_megatron.model.presets import recipe_arch
from joyai_megatron.quant.formats import QATConfigError, check_qat_recipe, modelopt_config
from tests.joyai_helpers import QAT_TINY, REPO, TINY_BASE
from tests.stages.qat_fixtures import memorization_overrides, write_memorization_corpus
from tests.stages.stage_helpers import Run, run_stage

QAT_48B = REPO / "recipes" / "qat" / "joyai_48b_a3b_int4.yaml"

# The QAT settings of recipes/qat/tiny_cpu.yaml on the memorisation corpus.
QAT_SETTINGS = [
    "stage=qat",
    "qat.block_size=32",
    "qat.calib_batches=1",
    "qat.freeze=[embedding.,output_layer.,norm]",
    "optim.lr=3.0e-4",
    "optim.min_lr=3.0e-4",
    "scheduler.decay_style=constant",
    "scheduler.warmup_tokens=1536",
    "checkpoint.load_optimizer=false",
    "checkpoint.resume_optimizer=true",
    "checkpoint.reset_counters=true",
    "train.eval_iters=3",
]


# --- recipe checks (no process group) ------------------------------------------------------------
def recipe(*overrides: str):
    return load_recipe(QAT_TINY, list(overrides))


def test_shipped_recipes_pass_the_checks() -> None:
    for path in (QAT_TINY, QAT_48B):
        r = load_recipe(path)
        check_qat_recipe(r, recipe_arch(r))
    big = load_recipe(QAT_48B)
    assert big.qat.block_size == 128 and big.qat.format == "int4_w4a16"
    assert not big.model.moe_grouped_gemm and big.precision.fp8 is None


def test_block_size_must_tile_every_quantized_width() -> None:
    r = recipe("qat.block_size=128")
    with pytest.raises(QATConfigError) as err:
        check_qat_recipe(r, recipe_arch(r))
    text = str(err.value)
    # The tiny model's 64-wide hidden size and 32-wide LoRA ranks / expert FFN are named.
    for name in ("hidden_size) = 64", "q_lora_rank) = 32", "kv_lora_rank) = 32", "moe_ffn_hidden_size"):
        assert name in text
    assert "largest power-of-two block that fits this model and layout is 32" in text
    # Tensor parallelism halves the row-parallel widths: 32 then no longer fits linear_proj/fc2.
    r = recipe("qat.block_size=64", "parallel.tp=2")
    with pytest.raises(QATConfigError, match="linear_proj"):
        check_qat_recipe(r, recipe_arch(r))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.moe_grouped_gemm=true"], "moe_grouped_gemm"),
        (["precision.fp8=e4m3"], "precision.fp8"),
        (["parallel.vpp=2"], "parallel.vpp"),
        (["qat.format=int3"], "qat.format"),
        (["qat.weight_amax=learned"], "qat.weight_amax"),
        (["qat.compare=true", "train.eval_interval=0"], "train.eval_interval"),
    ],
)
def test_recipe_errors_name_the_key(overrides: list[str], message: str) -> None:
    r = recipe(*overrides)
    with pytest.raises(QATConfigError, match=message):
        check_qat_recipe(r, recipe_arch(r))


def test_modelopt_config_follows_the_recipe() -> None:
    int4 = modelopt_config(recipe("qat.block_size=16", "qat.exclude=['*linear_kv_up_proj*']"))
    entries = {e["quantizer_name"]: e for e in int4["quant_cfg"]}
    assert entries["*weight_quantizer"]["cfg"]["block_sizes"][-1] == 16
    assert entries["*weight_quantizer"]["cfg"]["num_bits"] == 4
    assert entries["mtp.*"]["enable"] is False  # the MTP draft block stays high precision
    assert entries["*output_layer*"]["enable"] is False
    assert entries["*linear_kv_up_proj*"]["enable"] is False
    assert int4["algorithm"] == "max"
    w4a8 = modelopt_config(recipe("qat.format=w4afp8", "qat.quantize_mtp=true"))
    stages = {e["quantizer_name"]: e for e in w4a8["quant_cfg"]}["*weight_quantizer"]["cfg"]
    assert stages[0]["block_sizes"][-1] == 32 and stages[1]["num_bits"] == (4, 3)
    assert "mtp.*" not in {e["quantizer_name"] for e in w4a8["quant_cfg"]}
    assert w4a8["algorithm"] == "max"  # no AWQ search: QAT trains the weights instead


# --- fake quantization and packing on CPU, per format ----------------------------------------------
def rtn_int4(w: torch.Tensor, block: int) -> torch.Tensor:
    """Round-to-nearest symmetric INT4 with one absmax scale per ``block`` inputs (independent)."""
    rows, cols = w.shape
    blocks = w.reshape(rows, cols // block, block)
    scale = blocks.abs().amax(-1, keepdim=True) / 7.0
    return (torch.round(blocks / scale).clamp(-8, 7) * scale).reshape(rows, cols)


def fp8(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    scale = amax / 448.0
    return (x / scale).to(torch.float8_e4m3fn).float() * scale


@pytest.mark.parametrize("fmt", ["int4_w4a16", "w4afp8", "fp8"])
def test_fake_quant_and_export_numerics(fmt: str) -> None:
    """ModelOpt's CPU fake quant equals an independent reference, and the exported tensors
    (packed by ModelOpt's exporter) dequantize back to exactly the fake-quantized weight."""
    from joyai_megatron.quant.export import LinearQuant, materialize_weight_amax
    from joyai_megatron.quant.modelopt_state import calibrate, insert_quantizers
    from joyai_megatron.quant.reload import dequantize

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False))
    config = modelopt_config(recipe(f"qat.format={fmt}", "qat.block_size=16"))
    x = torch.randn(16, 64)
    insert_quantizers(model, config)
    calibrate(model, lambda m: m(x), weight_amax="dynamic")
    layer = model[0]
    w = layer.weight.detach()
    fake = layer.weight_quantizer(w).detach()
    if fmt == "fp8":
        expected = fp8(w, w.abs().max())
    else:
        expected = rtn_int4(w, 16)
        if fmt == "w4afp8":
            expected = fp8(expected, w.abs().max())  # the block absmax maps to itself
    torch.testing.assert_close(fake, expected, rtol=0, atol=1e-6)
    if fmt != "int4_w4a16":  # static FP8 activation scale from the calibration batch
        assert torch.allclose(layer.input_quantizer.amax, x.abs().max())
    materialize_weight_amax(model)
    q = LinearQuant.of(layer)
    packed = q.packed(w, slice(0, 32))
    back = dequantize(packed, q.weight_scale, q.weight_scale_2, "w")
    torch.testing.assert_close(back, fake, rtol=0, atol=1e-6)


def test_int4_nibble_layout() -> None:
    """Low nibble = even output row, high nibble = odd row, two's complement (TensorRT-LLM's)."""
    from joyai_megatron.quant.reload import unpack_int4

    q = torch.tensor([[-8, 7, 0], [3, -1, -5]], dtype=torch.int8)
    byte = (q[0] & 0x0F) | ((q[1] & 0x0F) << 4)
    assert torch.equal(unpack_int4(byte.to(torch.uint8)[None]), q)


def ulps(value: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest distance in units in the last place of ``reference``'s dtype."""
    _, exponent = torch.frexp(reference.float())
    spacing = torch.finfo(reference.dtype).eps * torch.exp2(exponent.float() - 1)
    return ((value.float() - reference.float()).abs() / spacing).max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compressed_tensors_packing_holds_the_quantizers_integers(dtype: torch.dtype) -> None:
    """compressed-tensors packing of a ModelOpt INT4 layer: the package's own unpack gives exactly
    the integers the fake quantizer used, in vLLM's uint4b8 word layout, and integers x scale
    reproduce Q(W) up to float rounding: ModelOpt computes q / (7/amax), the format q * (amax/7), and
    a bf16 export also rounds the scale to bf16 (bit equality is out of reach with one scale per
    group: for most fp32 groups no scale gives q * scale == Q(W) for all 15 codes)."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from joyai_megatron.quant import compressed
    from joyai_megatron.quant.export import LinearQuant, materialize_weight_amax, packing_input
    from joyai_megatron.quant.modelopt_state import calibrate, insert_quantizers
    from joyai_megatron.quant.reload import unpack_int4

    torch.manual_seed(0)
    rows, cols = 32, 1024  # enough BF16 weights to meet exact .5 ties (below)
    model = torch.nn.Sequential(torch.nn.Linear(cols, rows, bias=False)).to(dtype)
    insert_quantizers(model, modelopt_config(recipe("qat.block_size=16")))
    calibrate(model, lambda m: m(torch.randn(4, cols, dtype=dtype)), weight_amax="dynamic")
    layer = model[0]
    w = layer.weight.detach()
    fake = layer.weight_quantizer(w).detach()
    materialize_weight_amax(model)
    q = LinearQuant.of(layer)
    out = compressed.pack(fake, q.weight_scale, 16)
    assert out["weight_packed"].dtype == torch.int32 and out["weight_packed"].shape == (rows, cols // 8)
    assert out["weight_shape"].tolist() == [rows, cols]
    codes = unpack_from_int32(out["weight_packed"], 4, torch.Size(out["weight_shape"].tolist()))
    assert codes.abs().max() <= 7  # ModelOpt's narrow range [-7, 7] with scale amax/7
    # The unified export's integers are the same, because both start from Q(W).  ModelOpt's packer
    # applied to W itself rounds W / scale, not W * (7 / amax) as the quantizer does: in BF16 the two
    # sit on exact .5 ties often enough to pick other integers (which is why the export packs Q(W)).
    assert torch.equal(codes, unpack_int4(q.packed(packing_input(layer, q), slice(0, rows))))
    from_w = unpack_int4(q.packed(w, slice(0, rows)))
    assert (from_w != codes).any() == (dtype == torch.bfloat16)
    blocks = w.float().reshape(rows, cols // 16, 16)
    amax = blocks.abs().amax(-1, keepdim=True)
    torch.testing.assert_close(q.weight_scale, amax.squeeze(-1) / 7.0, rtol=0, atol=0)
    if dtype == torch.float32:  # independent round-to-nearest (bf16 weights hit exact .5 ties, whose
        # side depends on how the product is rounded: Q(W) decides, as checked below)
        expected = torch.round(blocks * (7.0 / amax)).reshape(rows, cols).to(torch.int8)
        assert torch.equal(codes, expected)
    word = sum((int(codes[0, i]) + 8) << (4 * i) for i in range(8))  # element i at bits 4i, stored q+8
    assert int(out["weight_packed"][0, 0]) == word - (1 << 32 if word >= 1 << 31 else 0)
    # The package's own decompression of the stored tensors (as transformers runs it on load).
    stored = {**out, "weight_scale": q.weight_scale.to(dtype)}
    back = PackedQuantizationCompressor.decompress(stored, compressed.int4_scheme(16))["weight"]
    assert back.dtype == dtype
    assert ulps(back, fake) <= 2.0  # measured: 2 ulp (fp32), 1 ulp (bf16)
    # A scale that is not the quantizer's (compressed-tensors' own amax/7.5) is refused.
    with pytest.raises(ConversionError, match="not on the INT4 grid"):
        compressed.pack(fake, q.weight_scale * 7.0 / 7.5, 16)


@pytest.mark.parametrize("fmt", ["w4afp8", "fp8"])
def test_compressed_tensors_refuses_other_qat_formats(fmt: str, tmp_path: Path, capsys) -> None:
    """Only INT4 weight-only recipes export to compressed-tensors; the refusal names the recipe's
    format and comes from the checkpoint's recipe alone, before any model is built."""
    from joyai_megatron.config.recipe import save_resolved_recipe
    from joyai_megatron.quant.export import main

    iteration = tmp_path / "ckpt" / "iter_0000001"
    save_resolved_recipe(recipe(f"qat.format={fmt}"), iteration)
    (iteration / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    (iteration / "modelopt_state").mkdir()
    (iteration / "COMPLETE").write_text("1")
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("1")
    argv = [
        "--checkpoint",
        str(tmp_path / "ckpt"),
        "--output",
        str(tmp_path / "hf"),
        "--format",
        "compressed-tensors",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"qat.format={fmt!r}" in err and "int4_w4a16" in err and "--format quantized" in err
    assert not (tmp_path / "hf").exists()


# --- training runs ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def memorized(stages_root: Path, demo_data: Path) -> dict:
    """A tiny model that has memorised the corpus (valid loss ~0.1): the unquantized reference."""
    root = stages_root / "qat"
    prefix = write_memorization_corpus(root / "data" / "mem")
    data = memorization_overrides(prefix, demo_data / "tokenizer", root / "cache")
    run = run_stage(
        "pretrain",
        TINY_BASE,
        root / "reference",
        [*data, "train.train_iters=160", "train.eval_interval=0", "optim.lr=1.0e-2", "optim.min_lr=1.0e-3",
         "scheduler.decay_style=cosine", "scheduler.warmup_tokens=2560", "checkpoint.save_interval=0"],
    )  # fmt: skip
    return {"root": root, "data": data, "reference": run}


def qat_run(memorized: dict, name: str, *overrides: str) -> Run:
    return run_stage(
        "qat",
        TINY_BASE,
        memorized["root"] / name,
        [
            *memorized["data"],
            *QAT_SETTINGS,
            f"checkpoint.load={memorized['reference'].checkpoint_dir}",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def qat_int4(memorized: dict) -> Run:
    return qat_run(
        memorized, "int4", "train.train_iters=24", "train.eval_interval=24", "checkpoint.save_interval=0"
    )


def test_qat_round_to_nearest_beats_ptq(qat_int4: Run) -> None:
    values = json.loads((qat_int4.log_dir / "qat_compare.json").read_text())
    unq, ptq, qat = values["unquantized"], values["ptq"], values["qat"]
    assert ptq - unq > 0.01, values  # INT4 PTQ visibly hurts the sharp reference
    assert abs(qat - unq) < abs(ptq - unq), values
    # The QAT model's own quantization gap is smaller than the one it started with.
    assert abs(qat - values["qat_unquantized"]) < ptq - unq, values
    # The stage's training loss is the fake-quantized model's: it starts at about the PTQ level.
    assert qat_int4.history[0]["lm_loss"] == pytest.approx(ptq, rel=0.5)


def test_compare_command_reproduces_the_stage(qat_int4: Run) -> None:
    from joyai_megatron.stages.qat_compare import compare_checkpoints

    stage = json.loads((qat_int4.log_dir / "qat_compare.json").read_text())
    again = compare_checkpoints(str(qat_int4.checkpoint_dir))
    for key in ("unquantized", "ptq", "qat", "qat_unquantized"):
        assert again[key] == stage[key], key


def test_checkpoint_holds_modelopt_state(qat_int4: Run) -> None:
    from joyai_megatron.training.checkpoint import resolve_checkpoint

    iteration = resolve_checkpoint(qat_int4.checkpoint_dir)
    assert (iteration / "modelopt_state" / "metadata.json").is_file()
    saved = json.loads((iteration / "train_state.json").read_text())
    assert set(saved["stage"]["comparison"]) == {"unquantized", "ptq"}


def test_full_recompute_trains_behind_a_frozen_embedding(memorized: dict) -> None:
    """The 48B QAT recipe freezes the embedding and recomputes every layer: Megatron's reentrant
    checkpoint never re-runs a layer block whose input needs no gradient, so without the trainer's
    embedding hook the decoder got no gradient at all (grad norm 0.03 instead of 0.19, routers
    counting no tokens).  Full recompute must train exactly like no recompute."""
    common = [
        "qat.compare=false",
        "train.eval_interval=0",
        "train.train_iters=2",
        "checkpoint.save_interval=0",
    ]
    runs = {
        mode: qat_run(memorized, f"recompute_{mode}", *common, f"model.recompute={mode}")
        for mode in ("none", "full")
    }
    for plain, recomputed in zip(runs["none"].history, runs["full"].history, strict=True):
        assert recomputed["grad_norm"] == plain["grad_norm"] and recomputed["lm_loss"] == plain["lm_loss"]
        assert recomputed["moe/load_max_over_min"] > 0  # the recomputed routers counted their tokens


def test_param_gather_hooks_cover_the_quantizers(memorized: dict) -> None:
    """The 48B recipe overlaps ZeRO-1's param all-gather (DDP forward pre-hooks on every submodule,
    registered when DDP wraps the model). ModelOpt's quantizers are added after that; the save's
    hook toggle then failed on them (``KeyError: TensorQuantizer(disabled)``, first QAT smoke on an
    H200 after the toggle came in)."""
    common = ["parallel.overlap_param_gather=true", "qat.compare=false", "train.eval_interval=0"]
    run = qat_run(memorized, "param_gather", *common, "train.train_iters=2")
    assert [h["step"] for h in run.history] == [1, 2]
    assert (run.checkpoint_dir / "iter_0000002" / "modelopt_state").is_dir()
    # Resuming restores the quantizers into the wrapped model (the other path that adds them).
    resumed = qat_run(memorized, "param_gather", *common, "train.train_iters=3")
    assert [h["step"] for h in resumed.history] == [3]
    assert (resumed.checkpoint_dir / "iter_0000003" / "modelopt_state").is_dir()


def test_resume_restores_quantizers_bitwise(memorized: dict) -> None:
    """W4AFP8 (calibrated static FP8 activation scales + INT4/FP8 weight stages): 2N steps straight
    equal N steps, a restart from the step-N checkpoint, and N more steps, bit for bit."""
    common = ["qat.format=w4afp8", "qat.compare=false", "train.eval_interval=0", "train.train_iters=6"]
    straight = qat_run(
        memorized, "w4afp8_straight", *common, "checkpoint.save_interval=3", "checkpoint.keep_last=3"
    )
    resumed_dir = memorized["root"] / "w4afp8_resumed"
    (resumed_dir / "ckpt").mkdir(parents=True)
    shutil.copytree(straight.checkpoint_dir / "iter_0000003", resumed_dir / "ckpt" / "iter_0000003")
    (resumed_dir / "ckpt" / "latest_checkpointed_iteration.txt").write_text("3")
    resumed = qat_run(memorized, "w4afp8_resumed", *common)
    assert [h["step"] for h in resumed.history] == [4, 5, 6]
    for a, b in zip(straight.history[3:], resumed.history, strict=True):
        assert a["lm_loss"] == b["lm_loss"] and a["grad_norm"] == b["grad_norm"], (a, b)
    # The restored activation scales are the calibrated ones, not a recalibration.
    from joyai_megatron.quant.export import load_qat_model
    from joyai_megatron.quant.modelopt_state import enabled_quantizers
    from joyai_megatron.training.distributed import shutdown

    try:
        final = dict(enabled_quantizers(load_qat_model(straight.checkpoint_dir).model, "input"))
        restored = dict(enabled_quantizers(load_qat_model(resumed.checkpoint_dir).model, "input"))
    finally:
        shutdown()
    assert final and final.keys() == restored.keys()
    for name, q in final.items():
        assert torch.equal(q.amax, restored[name].amax), name
    check_w4afp8_export(straight.checkpoint_dir, memorized["root"] / "w4afp8_hf")


def check_w4afp8_export(checkpoint: Path, out: Path) -> None:
    """W4AFP8 export: INT4 blocks + FP8 second-stage and activation scales, same weights as the
    fake-quantized model (activation quantization has no transformers counterpart: compared off)."""
    from joyai_megatron.convert.hf_io import HFCheckpoint
    from joyai_megatron.quant.export import export_qat_to_hf
    from joyai_megatron.quant.reload import compare_logits
    from joyai_megatron.training.distributed import shutdown

    try:
        export_qat_to_hf(checkpoint, out, dtype="fp32")
        diff = compare_logits(checkpoint, out)
    finally:
        shutdown()
    assert diff < 1e-4
    with pytest.raises(ConversionError, match="qat.format='w4afp8'"):
        export_qat_to_hf(checkpoint, out.with_name("w4afp8_ct"), fmt="compressed-tensors")
    quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "W4A8_AWQ" and quant["group_size"] == 32
    files = HFCheckpoint(out)
    name = "model.layers.0.self_attn.o_proj"
    assert files.dtype(f"{name}.weight") == torch.uint8
    assert files.shape(f"{name}.weight_scale_2") == () and files.shape(f"{name}.input_scale") == ()


def test_export_reloads_with_fake_quant_logits(qat_int4: Run, tmp_path: Path) -> None:
    from joyai_megatron.convert.hf_io import HFCheckpoint
    from joyai_megatron.quant.export import export_qat_to_hf
    from joyai_megatron.quant.reload import compare_logits, dequantized_tensors
    from joyai_megatron.training.distributed import shutdown

    try:
        export_qat_to_hf(qat_int4.checkpoint_dir, tmp_path / "int4", dtype="fp32")
        export_qat_to_hf(qat_int4.checkpoint_dir, tmp_path / "dq", fmt="dequantized", dtype="fp32")
        diff = compare_logits(qat_int4.checkpoint_dir, tmp_path / "int4")
    finally:
        shutdown()
    assert diff < 1e-4  # fp32 on both sides; documented in docs/qat.md
    quant = json.loads((tmp_path / "int4" / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "W4A16_AWQ" and quant["group_size"] == 32
    assert {"lm_head", "model.layers.1.mlp.gate", "model.layers.3*"} <= set(quant["exclude_modules"])
    config = json.loads((tmp_path / "int4" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "modelopt"
    packed = HFCheckpoint(tmp_path / "int4")
    name = "model.layers.1.mlp.experts.3.gate_proj"
    assert packed.dtype(f"{name}.weight") == torch.uint8 and packed.shape(f"{name}.weight") == (16, 64)
    assert packed.shape(f"{name}.weight_scale") == (32, 2)
    # Unpacking the INT4 export gives exactly the dequantized export's weights.
    plain = HFCheckpoint(tmp_path / "dq")
    tensors = dict(dequantized_tensors(tmp_path / "int4"))
    assert set(tensors) == set(plain.names())
    for key, value in tensors.items():
        torch.testing.assert_close(value, plain.get(key), rtol=0, atol=1e-6, msg=key)


def test_compressed_tensors_export_loads_in_transformers(qat_int4: Run, tmp_path: Path) -> None:
    """``--format compressed-tensors``: transformers loads it as is (its compressed-tensors
    integration unpacks through the package) with the fake-quantized model's logits; the integers
    and scales are the unified export's, everything else is byte-identical to it."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from transformers import AutoModelForCausalLM

    from joyai_megatron.convert.hf_io import HFCheckpoint
    from joyai_megatron.quant.export import export_qat_to_hf
    from joyai_megatron.quant.reload import compare_logits, unpack_int4
    from joyai_megatron.training.distributed import shutdown

    ct_dir, unified_dir = tmp_path / "ct", tmp_path / "int4"
    try:
        export_qat_to_hf(qat_int4.checkpoint_dir, ct_dir, fmt="compressed-tensors", dtype="fp32")
        export_qat_to_hf(qat_int4.checkpoint_dir, unified_dir, dtype="fp32")
        diff = compare_logits(qat_int4.checkpoint_dir, ct_dir)
    finally:
        shutdown()
    assert diff < 1e-4  # fp32 on both sides; documented in docs/qat.md
    config = json.loads((ct_dir / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["format"] == "pack-quantized"
    assert quant["quantization_status"] == "compressed" and list(quant["config_groups"]) == ["group_0"]
    group = quant["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["input_activations"] is None
    assert {k: group["weights"][k] for k in ("num_bits", "type", "symmetric", "strategy", "group_size")} == {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32
    }  # fmt: skip
    mtp = f"model.layers.{config['num_hidden_layers']}."
    assert {"lm_head", "model.layers.1.mlp.gate", f"{mtp}eh_proj", f"{mtp}self_attn.o_proj"} <= set(
        quant["ignore"]
    )

    model, info = AutoModelForCausalLM.from_pretrained(ct_dir, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    # As for every DeepseekV3 export: transformers builds no MTP layer and skips its tensors.
    assert info["unexpected_keys"] and all(k.startswith(mtp) for k in info["unexpected_keys"]), info
    assert model.dtype == torch.float32

    ct, unified = HFCheckpoint(ct_dir), HFCheckpoint(unified_dir)
    packed = {n[: -len("weight_packed")] for n in ct.names() if n.endswith(".weight_packed")}
    assert packed and not packed & {name + "." for name in quant["ignore"]}
    for name in unified.names():
        prefix = name[: -len("weight")]
        if prefix in packed:  # same integers and scales as the unified export
            shape = ct.get(prefix + "weight_shape")
            half_rows, cols = unified.shape(name)  # the unified format packs two rows per byte
            assert shape.dtype == torch.int64 and shape.tolist() == [2 * half_rows, cols]
            codes = unpack_from_int32(ct.get(prefix + "weight_packed"), 4, torch.Size(shape.tolist()))
            assert torch.equal(codes, unpack_int4(unified.get(name))), name
            assert torch.equal(ct.get(prefix + "weight_scale"), unified.get(prefix + "weight_scale")), name
        elif not name.endswith("weight_scale"):  # everything else byte for byte
            same = ct.dtype(name) == unified.dtype(name) and torch.equal(ct.get(name), unified.get(name))
            assert same, name
    assert len(ct.names()) == len(unified.names()) + len(packed)  # + weight_shape per quantized linear
