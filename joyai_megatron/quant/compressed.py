"""INT4 QAT weights in the compressed-tensors ``pack-quantized`` format, the one vLLM and SGLang load.

ModelOpt's unified export stores INT4 the TensorRT-LLM way (``W4A16_AWQ``), which vLLM and SGLang do
not read.  Both read compressed-tensors checkpoints (``quantization_config.quant_method:
compressed-tensors``, the format llm-compressor writes), so the exporter can also write that.  Per
quantized linear ``X`` it stores

* ``X.weight_packed``: int32 ``[out, ceil(in/8)]``, eight INT4 values per word along the input dim,
  each stored as ``q + 8`` (vLLM's ``uint4b8``), element ``i`` at bits ``4*(i % 8)`` of word ``i // 8``;
* ``X.weight_scale``: ``[out, in/group]`` in the export dtype (engines hold scales in the model dtype);
* ``X.weight_shape``: int64 ``[out, in]``;

and one config group ``{weights: {num_bits: 4, type: int, symmetric: true, strategy: group,
group_size}, input_activations: null, targets: [Linear]}`` with an ``ignore`` list naming every
linear kept in high precision.  Everything here goes through the ``compressed_tensors`` package
itself (its compressor packs, its pydantic classes build the config, its ``ModelCompressor`` writes
it into ``config.json``), so the layout is the package's, not a re-implementation of it.

**Same numbers as training.**  A consumer computes ``q * weight_scale``.  compressed-tensors' own
observers would pick ``scale = amax / 7.5`` over the range [-8, 7]; ModelOpt's QAT quantizer uses
``amax / 7`` over [-7, 7] (narrow range), so re-quantizing the master weights with the package's
defaults would give other integers than the model trained with.  Instead the scale is ModelOpt's
(the unified export's ``weight_scale``) and the integers are read off the quantizer's own output
Q(W): ``round(Q(W) / scale)`` recovers each code exactly, because Q(W) lies within a few float
roundings of ``q * scale``.  ``q * scale`` then equals Q(W) up to that float rounding (ModelOpt
computes ``q / (7 / amax)``; measured within 2 ulp in fp32, and no single fp32 scale per group
reproduces all 15 codes bit for bit in most groups).  A bf16 export also rounds the scale to bf16,
as the engines hold it (measured within 1 bf16 ulp of a bf16 model's Q(W)).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from joyai_megatron.convert.common import ConversionError

# The QAT formats (``qat.format``) whose weights this format stores: INT4 weight-only.  W4AFP8 adds
# an FP8 second weight stage and FP8 activations, FP8 is not INT4; neither is pack-quantized.
QAT_FORMATS = ("int4_w4a16",)
# ModelOpt's export name of the per-layer format those recipes quantize with.
MODELOPT_FORMAT = "int4_awq"
NUM_BITS = 4
PACK_FACTOR = 32 // NUM_BITS
# Q(W) / scale must sit this close to an integer; a bf16 model's Q(W) is off by at most 7 * 2^-9.
GRID_TOLERANCE = 0.05


def check_qat_format(qat_format: str) -> None:
    """Refuse checkpoints whose recipe did not train INT4 weight-only, before the model is built."""
    if qat_format not in QAT_FORMATS:
        raise ConversionError(
            f"--format compressed-tensors writes INT4 weight-only models (qat.format={QAT_FORMATS[0]!r}); "
            f"this checkpoint's recipe has qat.format={qat_format!r}. Export it with --format quantized "
            "(ModelOpt unified) or --format dequantized"
        )


def int4_scheme(group_size: int) -> Any:
    """The one config group: symmetric INT4 weights, one scale per ``group_size`` inputs, no
    activation quantization, on every ``Linear`` not in ``ignore``."""
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationScheme,
        QuantizationStrategy,
        QuantizationType,
    )

    weights = QuantizationArgs(
        num_bits=NUM_BITS,
        type=QuantizationType.INT,
        symmetric=True,
        strategy=QuantizationStrategy.GROUP,
        group_size=group_size,
        dynamic=False,
    )
    return QuantizationScheme(
        targets=["Linear"], weights=weights, format=CompressionFormat.pack_quantized.value
    )


def quantization_config(layer_config: dict[str, Any]) -> Any:
    """A compressed-tensors ``QuantizationConfig`` from the exporter's per-layer summary.

    ``layer_config`` maps ``<hf module>.quantization`` to ModelOpt's format name (None for a linear
    kept in high precision) and ``<hf module>.awq_block_size`` to its block, exactly what the
    unified export hands ModelOpt's summariser; here the None entries become the ``ignore`` list
    (explicit module names, which vLLM matches against its fused layers' parts too).
    """
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    formats = {v for k, v in layer_config.items() if k.endswith(".quantization") and v is not None}
    blocks = {v for k, v in layer_config.items() if k.endswith(".awq_block_size")}
    if formats != {MODELOPT_FORMAT} or len(blocks) != 1:
        raise ConversionError(
            f"compressed-tensors export needs every quantized linear in {MODELOPT_FORMAT} with one block "
            f"size; found formats {sorted(formats)} and block sizes {sorted(blocks)}"
        )
    ignore = [
        k.removesuffix(".quantization")
        for k, v in layer_config.items()
        if k.endswith(".quantization") and v is None
    ]
    return QuantizationConfig(
        config_groups={"group_0": int4_scheme(blocks.pop())},
        format=CompressionFormat.pack_quantized.value,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=ignore,
    )


def write_quantization_config(out_dir: Path, config: Any) -> None:
    """Add ``quantization_config`` to ``out_dir/config.json`` with the package's own writer (it also
    stamps ``version`` and ``quant_method``, which transformers and vLLM dispatch on)."""
    from compressed_tensors.compressors import ModelCompressor

    ModelCompressor(quantization_config=config).update_config(str(out_dir))


def packed_shape(rows: int, cols: int) -> tuple[int, int]:
    """Shape of ``weight_packed`` for a ``[rows, cols]`` weight (known before packing, for the planner)."""
    return rows, math.ceil(cols / PACK_FACTOR)


def pack(fake_quantized: torch.Tensor, scale: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """``weight_packed`` and ``weight_shape`` of one weight, from its fake-quantized value Q(W) and
    ModelOpt's fp32 per-group scale, through the package's ``pack-quantized`` compressor."""
    from compressed_tensors.compressors import PackedQuantizationCompressor

    values = fake_quantized.float()
    scale = scale.float()
    check_on_grid(values, scale, group_size)
    compressed = PackedQuantizationCompressor.compress(
        {"weight": values, "weight_scale": scale}, int4_scheme(group_size)
    )
    return {"weight_packed": compressed["weight_packed"], "weight_shape": compressed["weight_shape"]}


def check_on_grid(values: torch.Tensor, scale: torch.Tensor, group_size: int) -> None:
    """Q(W) / scale must be integers in the INT4 range: otherwise the scale is not the quantizer's
    and rounding would silently store other values than the model trained with."""
    codes = values.unflatten(-1, (-1, group_size)) / scale.unsqueeze(-1)
    off = (codes - codes.round()).abs().max().item() if codes.numel() else 0.0
    top = codes.abs().max().item() if codes.numel() else 0.0
    if off > GRID_TOLERANCE or top > 2 ** (NUM_BITS - 1):
        raise ConversionError(
            f"fake-quantized weight is not on the INT4 grid of its scales (max distance {off:.3g} from "
            f"an integer code, max |code| {top:.3g}): the quantizer is not ModelOpt's INT4 blockwise one"
        )
