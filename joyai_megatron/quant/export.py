"""QAT checkpoint -> Hugging Face DeepseekV3 directory: ModelOpt unified, compressed-tensors or dequantized.

``python -m joyai_megatron.quant.export --checkpoint <qat ckpt> --output <dir> [--format ...]``

* ``--format quantized`` (default): ModelOpt's unified HF format, as ``export_hf_checkpoint``
  writes it.  Each quantized linear ``X`` becomes ``X.weight`` (INT4 packed two per byte along the
  output dim, ``uint8`` [out/2, in]; or ``float8_e4m3fn`` for FP8), ``X.weight_scale`` (float32;
  INT4: one per block, [out, in/block]), ``X.weight_scale_2`` (W4AFP8: the per-tensor FP8 scale)
  and ``X.input_scale`` (static activation scale, W4AFP8/FP8).  ``hf_quant_config.json`` holds
  ``quantization.{quant_algo, group_size, exclude_modules}`` and ``config.json`` the same as
  ``quantization_config`` (``quant_method: modelopt``), both built with ModelOpt's own helpers.
  Everything else (embeddings, norms, routers, LM head, by default the MTP block) is written in
  ``--dtype``.
* ``--format compressed-tensors`` (INT4 W4A16 recipes only; others are refused before the model is
  built): the format vLLM and SGLang load INT4 models in (they do not read ModelOpt's INT4
  ``W4A16_AWQ``, which is TensorRT-LLM's).  Each quantized linear ``X`` becomes ``X.weight_packed``
  (int32 [out, in/8], eight values per word along the input dim), ``X.weight_scale`` ([out, in/block]
  in ``--dtype``) and ``X.weight_shape``; ``config.json`` gets a ``quant_method: compressed-tensors``
  ``pack-quantized`` config whose ``ignore`` lists the high-precision linears.  Integers and scales
  are the quantizer's own (:mod:`joyai_megatron.quant.compressed` says how and why); packing and
  config go through the ``compressed-tensors`` package.  Other tensors are written exactly as for
  ``--format quantized``.
* ``--format dequantized``: the same architecture with every quantized weight replaced by its
  fake-quantized value Q(W) in ``--dtype``: a plain checkpoint that any DeepseekV3 loader reads
  and that computes what the INT4 model computes (activation quantization of W4AFP8/FP8 aside).

The model is rebuilt in one process (TP=PP=EP=1, any training layout reshards on load) with the
checkpoint's recipe and backend, its quantizers restored from ``modelopt_state/``, and its
weights loaded by Megatron's own loader; names then follow the conversion mapping
(:mod:`joyai_megatron.convert.mapping`) exactly like ``python -m joyai_megatron.convert to-hf``.
Scales and packed values are computed by ModelOpt's export functions from the module's own
quantizers, in the dtype the model trained in.  Host memory: the model (2 bytes per parameter
for a BF16 recipe) plus what the shard writers hold.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from joyai_megatron.convert.common import (
    HF_DTYPE_NAMES,
    ConversionError,
    atomic_output_dir,
    parse_dtype,
)
from joyai_megatron.convert.hf_config import arch_to_hf_config, write_tokenizer_files
from joyai_megatron.convert.hf_io import PlannedTensor, write_hf_shards
from joyai_megatron.convert.mapping import MappingTable, TensorMap, mapping_table, megatron_to_hf
from joyai_megatron.convert.to_hf import KEEP_FP32
from joyai_megatron.errors import cli_entry
from joyai_megatron.model.presets import ModelArch
from joyai_megatron.quant import compressed
from joyai_megatron.quant.qat_model import QATModel, checkpoint_recipe, load_qat_model

FORMATS = ("quantized", "dequantized", "compressed-tensors")
# Formats that store packed integers and scales (the others write plain tensors only).
PACKED_FORMATS = ("quantized", "compressed-tensors")
HF_QUANT_CONFIG = "hf_quant_config.json"


@torch.no_grad()
def materialize_weight_amax(model: torch.nn.Module) -> None:
    """Give every dynamic weight quantizer a stored amax (ModelOpt's max calibration of the weight):
    the per-block absmax a dynamic quantizer derives at each forward, now fixed for export."""
    from modelopt.torch.quantization.model_calib import enable_stats_collection, finish_stats_collection

    for module in quantized_linears(model).values():
        quantizer = module.weight_quantizer
        if all(getattr(q, "_amax", None) is not None for q in _leaves(quantizer)):
            continue
        enable_stats_collection(quantizer)
        quantizer(module.weight)
        finish_stats_collection(quantizer)


def _leaves(quantizer: torch.nn.Module) -> list[Any]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return [m for m in quantizer.modules() if isinstance(m, TensorQuantizer)]


def quantized_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Module name -> linear layer whose weight quantizer is enabled."""
    out = {}
    for name, module in model.named_modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if quantizer is not None and any(q.is_enabled for q in _leaves(quantizer)):
            out[name] = module
    return out


def named_model_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters and router biases under the single-process (global = local) names."""
    named = list(model.named_parameters())
    named += [(n, b) for n, b in model.named_buffers() if n.endswith("router.expert_bias")]
    return named


# --- per-layer tensors --------------------------------------------------------------------------
@dataclass
class LinearQuant:
    """One quantized Megatron linear: ModelOpt's format name and its export scales."""

    fmt: str
    block: int
    weight_scale: torch.Tensor  # INT4: [out, in/block]; FP8: 0-dim
    weight_scale_2: torch.Tensor | None
    input_scale: torch.Tensor | None

    @classmethod
    def of(cls, module: torch.nn.Module) -> LinearQuant:
        from modelopt.torch.export.quant_utils import (
            get_activation_scaling_factor,
            get_quantization_format,
            get_weight_block_size,
            get_weight_scaling_factor,
            get_weight_scaling_factor_2,
        )

        fmt = get_quantization_format(module)
        if fmt not in ("int4_awq", "w4a8_awq", "fp8"):
            raise ConversionError(f"ModelOpt format {fmt!r} is not one this exporter writes")
        wsf = get_weight_scaling_factor(module).float()
        wsf2 = get_weight_scaling_factor_2(module)
        isf = get_activation_scaling_factor(module)
        return cls(
            fmt=fmt,
            block=get_weight_block_size(module),
            weight_scale=wsf.reshape(()) if fmt == "fp8" else wsf,
            weight_scale_2=None if wsf2 is None else wsf2.float().reshape(()),
            input_scale=None if isf is None else isf.float().reshape(()),
        )

    def packed(self, weight: torch.Tensor, rows: slice) -> torch.Tensor:
        from modelopt.torch.export.quant_utils import to_quantized_weight

        scale = self.weight_scale if self.fmt == "fp8" else self.weight_scale[rows]
        return to_quantized_weight(weight[rows], scale, self.fmt, self.weight_scale_2, self.block)

    def packed_shape(self, rows: int, cols: int) -> tuple[tuple[int, int], torch.dtype]:
        if self.fmt == "fp8":
            return (rows, cols), torch.float8_e4m3fn
        if rows % 2:
            raise ConversionError(f"INT4 packing pairs output rows; a part with {rows} rows cannot be packed")
        return (rows // 2, cols), torch.uint8


def _part_rows(row: TensorMap) -> list[slice]:
    out, start = [], 0
    for n in row.row_splits:
        out.append(slice(start, start + n))
        start += n
    return out


def _quantized_row(row: TensorMap, module: torch.nn.Module, q: LinearQuant) -> list[PlannedTensor]:
    if row.copies:
        raise ConversionError(f"{row.megatron} is quantized but is also written as {row.copies}")
    planned = []
    for hf_name, rows in zip(row.hf, _part_rows(row), strict=True):
        prefix = hf_name[: -len("weight")]
        shape, dtype = q.packed_shape(rows.stop - rows.start, module.weight.shape[1])
        # Computed when the shard is written: no second copy of every weight held at once.
        planned.append(PlannedTensor(hf_name, shape, dtype, _bind(_pack_unified, module, q, rows)))
        scale = q.weight_scale if q.fmt == "fp8" else q.weight_scale[rows]
        planned.append(_constant(prefix + "weight_scale", scale))
        if q.weight_scale_2 is not None:
            planned.append(_constant(prefix + "weight_scale_2", q.weight_scale_2))
        if q.input_scale is not None:
            planned.append(_constant(prefix + "input_scale", q.input_scale))
    return planned


def packing_input(module: torch.nn.Module, q: LinearQuant) -> torch.Tensor:
    """The tensor ModelOpt's packer turns into integers.  INT4: the quantizer's own Q(W), not W.
    The packer recomputes round(W / scale) while the quantizer computed round(W * (7 / amax)); in
    BF16 both land on exact .5 ties often, and the two roundings then pick neighbouring integers
    (180 of 262,144 codes of a random BF16 layer; every layer of a BF16 QAT model, whose reloaded
    logits were off by 0.41 on an H200).  Q(W) / scale is within float rounding of the integer the
    model trained with."""
    if q.fmt == compressed.MODELOPT_FORMAT:
        return _fake_quantized(module)
    return module.weight.detach()


def _pack_unified(module: torch.nn.Module, q: LinearQuant, rows: slice) -> torch.Tensor:
    return q.packed(packing_input(module, q), rows)


def _compressed_row(
    row: TensorMap, module: torch.nn.Module, q: LinearQuant, dtype: torch.dtype
) -> list[PlannedTensor]:
    """compressed-tensors ``weight_packed``/``weight_scale``/``weight_shape`` of each HF part of one
    quantized linear; the integers come from the module's own fake-quantized weight."""
    if q.fmt != compressed.MODELOPT_FORMAT:
        raise ConversionError(
            f"{row.megatron}: ModelOpt format {q.fmt!r}; compressed-tensors export stores {compressed.MODELOPT_FORMAT}"
        )
    if row.copies:
        raise ConversionError(f"{row.megatron} is quantized but is also written as {row.copies}")
    cols = module.weight.shape[1]
    planned = []
    for hf_name, rows in zip(row.hf, _part_rows(row), strict=True):
        prefix = hf_name[: -len("weight")]
        shape = compressed.packed_shape(rows.stop - rows.start, cols)
        planned.append(
            PlannedTensor(prefix + "weight_packed", shape, torch.int32, _bind(_pack_part, module, q, rows))
        )
        planned.append(_constant(prefix + "weight_scale", q.weight_scale[rows].to(dtype)))
        planned.append(_constant(prefix + "weight_shape", torch.tensor([rows.stop - rows.start, cols])))
    return planned


def _pack_part(module: torch.nn.Module, q: LinearQuant, rows: slice) -> torch.Tensor:
    # Q(W) of the whole weight: a stored amax covers all rows, so the quantizer cannot take a slice.
    return compressed.pack(_fake_quantized(module)[rows], q.weight_scale[rows], q.block)["weight_packed"]


def _bind(fn: Callable, *args: Any) -> Callable[[], torch.Tensor]:
    return lambda: fn(*args)


def _constant(name: str, value: torch.Tensor) -> PlannedTensor:
    value = value.detach().contiguous()
    return PlannedTensor(name, tuple(value.shape), value.dtype, lambda: value)


def _plain_row(name: str, tensor: torch.Tensor, arch: ModelArch, dtype: torch.dtype) -> list[PlannedTensor]:
    planned = []
    for hf_name, part in megatron_to_hf(name, tensor.detach(), arch):
        out_dtype = torch.float32 if hf_name.endswith(KEEP_FP32) else dtype
        planned.append(PlannedTensor(hf_name, tuple(part.shape), out_dtype, _bind(_cast, part, out_dtype)))
    return planned


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).contiguous()


@torch.no_grad()
def _fake_quantized(module: torch.nn.Module) -> torch.Tensor:
    return module.weight_quantizer(module.weight.detach())


def plan_qat_export(
    loaded: QATModel, fmt: str, dtype: torch.dtype
) -> tuple[list[PlannedTensor], dict[str, Any]]:
    """Every HF tensor in mapping order, and ModelOpt's per-layer config (HF module names)."""
    arch, model = loaded.arch, loaded.model
    table: MappingTable = mapping_table(arch, include_mtp=arch.mtp_num_layers > 0)
    quantized = quantized_linears(model)
    planned: list[PlannedTensor] = []
    layer_config: dict[str, Any] = {}
    by_megatron = {}
    for name, tensor in named_model_tensors(model):
        if name.startswith("mtp.") and not table.include_mtp:
            continue
        by_megatron[table.row(name).megatron] = (name, tensor)
    for row in table.rows:
        if row.megatron not in by_megatron:
            raise ConversionError(f"the rebuilt model has no tensor for {row.megatron}")
        name, tensor = by_megatron[row.megatron]
        module_name, _, leaf = name.rpartition(".")
        module = quantized.get(module_name) if leaf == "weight" else None
        if module is not None and fmt in PACKED_FORMATS:
            q = LinearQuant.of(module)
            if fmt == "quantized":
                planned += _quantized_row(row, module, q)
            else:
                planned += _compressed_row(row, module, q, dtype)
            for hf_name in row.hf:
                layer_config[hf_name[: -len(".weight")] + ".quantization"] = q.fmt
                layer_config[hf_name[: -len(".weight")] + ".awq_block_size"] = q.block
            continue
        if module is not None:
            planned += _plain_row(name, _fake_quantized(module), arch, dtype)
            continue
        planned += _plain_row(name, tensor, arch, dtype)
        if leaf == "weight" and tensor.dim() == 2 and not row.megatron.endswith("word_embeddings.weight"):
            # Linear layers left in high precision (LM head, routers, excluded and MTP layers).
            for hf_name in (*row.hf, *row.copies):
                if not hf_name.endswith("embed_tokens.weight"):
                    layer_config[hf_name[: -len(".weight")] + ".quantization"] = None
    return planned, layer_config


def hf_quant_config(layer_config: dict[str, Any]) -> dict[str, Any]:
    """``hf_quant_config.json`` from the per-layer formats, through ModelOpt's own summariser."""
    import modelopt
    from modelopt.torch.export.quant_utils import process_layer_quant_config

    quantization = {"quant_algo": None, "kv_cache_quant_algo": None}
    quantization.update(process_layer_quant_config(layer_config))
    if quantization.get("quant_algo") in ("W4A16_AWQ", "W4A8_AWQ"):
        # ModelOpt's summariser always announces AWQ pre-quant scales for INT4; QAT learns the
        # weights instead of smoothing them, so no pre_quant_scale tensors exist to be loaded.
        quantization["pre_quant_scale"] = False
    return {"producer": {"name": "modelopt", "version": modelopt.__version__}, "quantization": quantization}


@dataclass(frozen=True)
class QATExportResult:
    output: Path
    tensors: int
    bytes: int
    quant_algo: str | None
    seconds: float


def export_qat_to_hf(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    fmt: str = "quantized",
    dtype: str = "bf16",
    model_type: str = "deepseek_v3",
    include_mtp: bool = True,
    max_shard_bytes: int = 5 * 2**30,
    threads: int = 4,
    overwrite: bool = False,
) -> QATExportResult:
    """Write the HF export of a QAT checkpoint (see the module docstring)."""
    if fmt not in FORMATS:
        raise ConversionError(f"--format must be one of {FORMATS}, got {fmt!r}")
    out_dtype = parse_dtype(dtype)
    if out_dtype is None:
        raise ConversionError("--dtype must name a dtype (bf16, fp16 or fp32) for a QAT export")
    start = time.perf_counter()
    if fmt == "compressed-tensors":
        compressed.check_qat_format(checkpoint_recipe(checkpoint).qat.format)
    loaded = load_qat_model(checkpoint, include_mtp=include_mtp)
    materialize_weight_amax(loaded.model)
    planned, layer_config = plan_qat_export(loaded, fmt, out_dtype)
    config = arch_to_hf_config(
        loaded.arch,
        model_type=model_type,
        include_mtp=loaded.arch.mtp_num_layers > 0,
        dtype=HF_DTYPE_NAMES[out_dtype],
    )
    quant_config = hf_quant_config(layer_config) if fmt == "quantized" else None
    if quant_config is not None:
        from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

        config["quantization_config"] = convert_hf_quant_config_format(quant_config)
    ct_config = compressed.quantization_config(layer_config) if fmt == "compressed-tensors" else None
    with atomic_output_dir(output, overwrite, inputs=[checkpoint]) as tmp:
        write_hf_shards(tmp, planned, max_shard_bytes=max_shard_bytes, threads=threads)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if quant_config is not None:
            (tmp / HF_QUANT_CONFIG).write_text(json.dumps(quant_config, indent=2) + "\n")
        if ct_config is not None:
            compressed.write_quantization_config(tmp, ct_config)
        write_tokenizer_files(loaded.recipe.data.tokenizer, loaded.arch, tmp)
    return QATExportResult(
        output=Path(output).resolve(),
        tensors=len(planned),
        bytes=sum(t.nbytes for t in planned),
        quant_algo=_algo(quant_config, ct_config),
        seconds=time.perf_counter() - start,
    )


def _algo(quant_config: dict[str, Any] | None, ct_config: Any) -> str | None:
    """What the export announces: ModelOpt's ``quant_algo``, or the compressed-tensors format."""
    if quant_config is not None:
        return quant_config["quantization"]["quant_algo"]
    if ct_config is not None:
        return f"{ct_config.format}, int4 group {ct_config.config_groups['group_0'].weights.group_size}"
    return None


@cli_entry
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m joyai_megatron.quant.export", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--checkpoint", required=True, help="QAT <ckpt_dir> (newest complete step) or <ckpt_dir>/iter_*"
    )
    p.add_argument("--output", required=True)
    p.add_argument("--format", default="quantized", choices=FORMATS)
    p.add_argument("--dtype", default="bf16", help="dtype of the high-precision tensors: bf16 | fp16 | fp32")
    p.add_argument("--model-type", default="deepseek_v3", choices=["deepseek_v3", "joyai_llm_flash"])
    p.add_argument("--no-mtp", action="store_true", help="leave the MTP block out")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--verify-logits",
        action="store_true",
        help="reload the export in transformers and compare logits with the fake-quantized checkpoint",
    )
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |logit diff| for --verify-logits")
    args = p.parse_args(argv)
    r = export_qat_to_hf(
        args.checkpoint,
        args.output,
        fmt=args.format,
        dtype=args.dtype,
        model_type=args.model_type,
        include_mtp=not args.no_mtp,
        threads=args.threads,
        overwrite=args.overwrite,
    )
    algo = f" ({r.quant_algo})" if r.quant_algo else ""
    print(
        f"quant.export: {args.format}{algo}, {r.tensors} tensors, {r.bytes / 2**20:.1f} MiB -> {r.output} "
        f"({r.seconds:.1f} s)"
    )
    if args.verify_logits:
        from joyai_megatron.quant.reload import compare_logits

        diff = compare_logits(args.checkpoint, r.output)
        ok = diff <= args.tolerance
        print(
            f"quant.export: reloaded logits vs fake-quantized model: max |diff| {diff:.3g} "
            f"({'within' if ok else 'above'} tolerance {args.tolerance:g})"
        )
        if not ok:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
