"""Megatron ``torch_dist`` checkpoint (any training layout) -> Hugging Face DeepseekV3 directory.

Reads the architecture from the checkpoint's ``recipe.yaml``, checks every stored tensor against it
before writing anything, then streams each HF tensor straight from the stored chunks into
safetensors shards written by parallel threads.  Peak memory is about one tensor per thread.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from joyai_megatron.checksums import hash_directory
from joyai_megatron.convert.common import (
    HF_DTYPE_NAMES,
    ConversionError,
    atomic_output_dir,
    parse_dtype,
)
from joyai_megatron.convert.dist_ckpt import DistCkptReader, resolve_iteration_dir
from joyai_megatron.convert.hf_config import arch_to_hf_config, write_tokenizer_files
from joyai_megatron.convert.hf_io import PlannedTensor, write_hf_shards
from joyai_megatron.convert.mapping import MappingTable, TensorMap, mapping_table
from joyai_megatron.convert.plan import check_checkpoint, row_regions
from joyai_megatron.model.presets import recipe_arch
from joyai_megatron.training.checkpoint_model import load_checkpoint_recipe
from joyai_megatron.training.checkpoint_scan import verify_directory

# Rounding the router bias would change which experts are picked; transformers keeps it in fp32.
KEEP_FP32 = ("e_score_correction_bias",)


@dataclass(frozen=True)
class ExportResult:
    output: Path
    tensors: int
    bytes: int
    shards: int
    seconds: float


def _reader_fn(
    reader: DistCkptReader, row: TensorMap, part: int, stored: list[str], dtype: torch.dtype | None
):
    """A closure that reads one HF tensor; with two stored spellings, they must agree."""
    shape = row.hf_shapes[part]
    regions = [row_regions(row, name)[part] for name in stored]

    def make() -> torch.Tensor:
        tensors = [reader.read(r.key, r.offsets, r.sizes).reshape(shape) for r in regions]
        for other, r in zip(tensors[1:], regions[1:], strict=True):
            if not torch.equal(tensors[0], other):
                raise ConversionError(
                    f"{regions[0].key} and {r.key} are the same tensor under the local and TE backends' "
                    "names but hold different values"
                )
        return tensors[0] if dtype is None else tensors[0].to(dtype)

    return make


def plan_export(
    reader: DistCkptReader, table: MappingTable, dtype: torch.dtype | None
) -> list[PlannedTensor]:
    """Every HF tensor (HF order) with the closure that produces it; validates shapes first."""
    stored = check_checkpoint(table, reader.tensors, ignore_mtp=not table.include_mtp)
    planned = []
    for row in table.rows:
        names = stored[row.megatron]
        key = row_regions(row, names[0])[0].key
        src_dtype = reader.tensors[key].dtype
        for part, hf_name in enumerate(row.hf):
            out_dtype = src_dtype if dtype is None or hf_name.endswith(KEEP_FP32) else dtype
            cast = None if out_dtype == src_dtype else out_dtype
            make = _reader_fn(reader, row, part, names, cast)
            planned.append(PlannedTensor(hf_name, row.hf_shapes[part], out_dtype, make))
            if len(row.hf) == 1:
                planned += [PlannedTensor(c, row.megatron_shape, out_dtype, make) for c in row.copies]
    return planned


def export_to_hf(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    model_type: str = "deepseek_v3",
    include_mtp: bool = True,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    threads: int = 4,
    overwrite: bool = False,
    progress: bool = True,
) -> ExportResult:
    """Convert ``checkpoint`` (``<ckpt_dir>`` or an ``iter_*`` dir) into an HF model at ``output``."""
    start = time.perf_counter()
    iter_dir = resolve_iteration_dir(checkpoint)
    note = verify_directory(iter_dir, contents=False)  # sizes only: `convert verify` reads every byte
    if note and progress:
        print(f"to-hf: note: {note}")
    recipe = load_checkpoint_recipe(iter_dir)
    arch = recipe_arch(recipe)
    include_mtp = include_mtp and arch.mtp_num_layers > 0
    table = mapping_table(arch, include_mtp)
    reader = DistCkptReader(iter_dir)
    planned = plan_export(reader, table, parse_dtype(dtype))
    total = sum(t.nbytes for t in planned)
    main_dtype = planned[0].dtype
    config = arch_to_hf_config(
        arch, model_type=model_type, include_mtp=include_mtp, dtype=HF_DTYPE_NAMES.get(main_dtype, "bfloat16")
    )
    with atomic_output_dir(output, overwrite, inputs=[iter_dir.parent]) as tmp:
        with tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="to-hf", disable=not progress
        ) as bar:
            weight_map = write_hf_shards(
                tmp, planned, max_shard_bytes=max_shard_bytes, threads=threads, on_write=bar.update
            )
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copied = write_tokenizer_files(recipe.data.tokenizer, arch, tmp)
        if recipe.data.tokenizer and not copied:
            print(
                f"to-hf: no tokenizer files found in data.tokenizer={recipe.data.tokenizer!r}; export has none"
            )
        hash_directory(tmp, threads)
    return ExportResult(
        output=Path(output).resolve(),
        tensors=len(planned),
        bytes=total,
        shards=len(set(weight_map.values())),
        seconds=time.perf_counter() - start,
    )
