"""Read a ModelOpt unified HF export back, and check it against the fake-quantized model.

:func:`dequantized_tensors` undoes the export's packing from the files alone (no ModelOpt): INT4
values are two's-complement nibbles, the low nibble of byte ``[r, c]`` is row ``2r`` and the high
nibble row ``2r+1``, multiplied by their block's ``weight_scale``; W4AFP8 then rounds that through
FP8 with ``weight_scale_2``; FP8 weights are ``weight.float() * weight_scale``.

:func:`compare_logits` is the export's acceptance check: the dequantized weights in
``transformers.DeepseekV3ForCausalLM`` against the Megatron model fake-quantizing with the same
quantizers, on random prompts in fp32 on CPU.  Activation quantization (W4AFP8, FP8) has no
counterpart in transformers, so those formats are compared with the Megatron side's activation
quantizers off: the check then covers exactly what the files store, the weights.  A
compressed-tensors export needs no unpacking here: transformers loads it as it is (its
compressed-tensors integration dequantizes through the package), the same files vLLM and SGLang read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from joyai_megatron.convert.common import ConversionError, copy_tokenizer_files
from joyai_megatron.convert.hf_io import HFCheckpoint, PlannedTensor, write_hf_shards

SCALE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale")


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out/2, in] -> int8 [out, in] in [-8, 7]."""
    low = (packed & 0x0F).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    low = torch.where(low > 7, low - 16, low)
    high = torch.where(high > 7, high - 16, high)
    return torch.stack([low, high], dim=1).reshape(2 * packed.shape[0], packed.shape[1])


def fp8_round_trip(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float() * scale


def dequantize(
    weight: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor | None, name: str
) -> torch.Tensor:
    """One exported weight (with its scales) -> its fp32 value."""
    if weight.dtype == torch.float8_e4m3fn:
        return weight.float() * scale.float()
    if weight.dtype != torch.uint8:
        raise ConversionError(f"{name}: quantized weight has dtype {weight.dtype}, expected uint8 or float8")
    q = unpack_int4(weight).float()
    if q.shape[1] % scale.shape[1]:
        raise ConversionError(
            f"{name}: {q.shape[1]} input channels do not split into {scale.shape[1]} blocks"
        )
    block = q.shape[1] // scale.shape[1]
    value = q * scale.float().repeat_interleave(block, dim=1)
    return value if scale_2 is None else fp8_round_trip(value, scale_2.float())


def dequantized_tensors(hf_dir: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, fp32 tensor) of every model tensor, quantized ones dequantized; scales consumed."""
    ckpt = HFCheckpoint(hf_dir)
    names = set(ckpt.names())
    for name in ckpt.names():
        if name.endswith(SCALE_SUFFIXES):
            continue
        scale_name = name[: -len("weight")] + "weight_scale" if name.endswith(".weight") else None
        if scale_name in names:
            scale_2 = name[: -len("weight")] + "weight_scale_2"
            s2 = ckpt.get(scale_2) if scale_2 in names else None
            yield name, dequantize(ckpt.get(name), ckpt.get(scale_name), s2, name)
        else:
            yield name, ckpt.get(name).float()


def write_dequantized(hf_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """A plain fp32 DeepseekV3 directory (no quantization_config) from a quantized export."""
    hf_dir, out = Path(hf_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = dict(dequantized_tensors(hf_dir))
    planned = [
        PlannedTensor(n, tuple(t.shape), t.dtype, (lambda t=t: t.contiguous())) for n, t in tensors.items()
    ]
    write_hf_shards(out, planned, max_shard_bytes=5 * 2**30, threads=1)
    config = json.loads((hf_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    config["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_tokenizer_files(hf_dir, out)
    return out


@torch.no_grad()
def compare_logits(
    checkpoint: str | os.PathLike, hf_dir: str | os.PathLike, *, batch: int = 2, seq: int = 16, seed: int = 0
) -> float:
    """Max |logits| difference between the export (dequantized) and the fake-quantized checkpoint."""
    from joyai_megatron.convert.megatron_model import megatron_logits
    from joyai_megatron.convert.verify import load_hf_model
    from joyai_megatron.quant import modelopt_state as mos
    from joyai_megatron.quant.qat_model import load_qat_model

    loaded = load_qat_model(checkpoint)
    inputs = [q for _, q in mos.enabled_quantizers(loaded.model, "input")]
    for q in inputs:
        q.disable()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, loaded.arch.vocab_size, (batch, seq), generator=gen)
    meg, _ = megatron_logits(loaded.model.float(), ids)
    if is_compressed_tensors(hf_dir):
        # transformers reads compressed-tensors itself (unpacking through the package): load as is.
        ref = load_hf_model(hf_dir)(ids).logits
        return (meg - ref).abs().max().item()
    tmp = Path(tempfile.mkdtemp(prefix="qat_reload_"))
    try:
        ref = load_hf_model(write_dequantized(hf_dir, tmp))(ids).logits
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return (meg - ref).abs().max().item()


def is_compressed_tensors(hf_dir: str | os.PathLike) -> bool:
    """Whether ``config.json`` declares a compressed-tensors checkpoint (``--format compressed-tensors``)."""
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    return config.get("quantization_config", {}).get("quant_method") == "compressed-tensors"
