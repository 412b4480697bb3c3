"""Hugging Face DeepseekV3 directory (JoyAI-LLM-Flash / -Base) -> Megatron ``torch_dist`` checkpoint.

The output is what the trainer itself would save for ``{'model': model.sharded_state_dict()}`` at
iteration 0 (global keys, so it loads under any parallel layout), plus ``recipe.yaml`` derived from
``config.json`` and the tracker file, so ``checkpoint.load=<output>`` starts from it.  No Megatron
model is built: each stored chunk is read from the safetensors files only when a writer thread
needs it.

Transformer Engine fuses three norms into the next linear and saves them under fused names
(``linear_q_up_proj.layer_norm_weight``, ``linear_kv_up_proj.layer_norm_weight`` and, in dense
layers, ``mlp.linear_fc1.layer_norm_weight``); the local backend saves its separate norm modules
under the same names (``model/spec.py``), so that spelling, the default, loads on either backend.
``names="local"`` writes the separate-module names that checkpoints had before the backends shared
the format.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from joyai_megatron.config.recipe import save_resolved_recipe
from joyai_megatron.config.schema import Recipe
from joyai_megatron.convert.common import (
    TOKENIZER_FILES,
    ConversionError,
    atomic_output_dir,
    parse_dtype,
)
from joyai_megatron.convert.dist_ckpt import (
    TRACKER_FILE,
    ChunkToWrite,
    extra_state_key,
    write_dist_checkpoint,
)
from joyai_megatron.convert.hf_config import arch_from_hf_config, load_hf_config
from joyai_megatron.convert.hf_io import HFCheckpoint
from joyai_megatron.convert.mapping import MappingTable, mapping_table
from joyai_megatron.convert.plan import check_hf, row_regions, row_storage_names, storage_shapes
from joyai_megatron.model.presets import ModelArch
from joyai_megatron.training.checkpoint_scan import seal

KEEP_FP32 = ("e_score_correction_bias",)
_RECIPE_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class ImportResult:
    output: Path
    iteration_dir: Path
    chunks: int
    bytes: int
    seconds: float


def _check_mtp_copies(hf: HFCheckpoint, table: MappingTable, absent: list[str]) -> None:
    """DeepSeek's MTP shares the main embedding and head: stored copies must be identical."""
    for name, row in table.copy_of.items():
        if name in absent:
            continue
        if not torch.equal(hf.get(name), hf.get(row.hf[0])):
            raise ConversionError(
                f"{name} differs from {row.hf[0]}; the MTP block shares the main embedding and LM head, "
                "so Megatron keeps one copy"
            )


def plan_import(
    hf: HFCheckpoint, table: MappingTable, dtype: torch.dtype | None, names: str
) -> tuple[list[ChunkToWrite], dict[str, object]]:
    """Every stored chunk (with its loader) and ``_extra_state`` object of the Megatron checkpoint."""
    shapes = storage_shapes(table, names)
    key_dtype: dict[str, torch.dtype] = {}
    chunks = []
    objects: dict[str, object] = {}
    for row in table.rows:
        for name in row_storage_names(row, names):
            for hf_name, region in zip(row.hf, row_regions(row, name), strict=True):
                src = hf.dtype(hf_name)
                want = src if dtype is None or hf_name.endswith(KEEP_FP32) else dtype
                out = key_dtype.setdefault(region.key, want)

                def load(
                    hf_name: str = hf_name, sizes: tuple[int, ...] = region.sizes, out: torch.dtype = out
                ) -> torch.Tensor:
                    return hf.get(hf_name).reshape(sizes).to(out)

                chunks.append(
                    ChunkToWrite(region.key, region.offsets, region.sizes, shapes[region.key], out, load)
                )
        obj = extra_state_key(row.megatron, table.arch.num_experts)
        if obj is not None:
            objects[obj] = None
    return chunks, objects


def recipe_for(arch: ModelArch, hf_dir: Path, dtype: torch.dtype, names: str) -> Recipe:
    """The resolved recipe saved beside the import: the shapes of config.json, nothing hand-written."""
    recipe = Recipe(name=f"from-hf:{hf_dir.name}", stage="pretrain")
    recipe.model.preset = "joyai_48b_a3b"
    recipe.model.arch = dataclasses.asdict(arch)
    recipe.model.mtp_enabled = arch.mtp_num_layers > 0
    recipe.model.backend = "te" if names == "te" else "local"
    recipe.precision.dtype = _RECIPE_DTYPES.get(dtype, "bf16")
    if any((hf_dir / f).is_file() for f in TOKENIZER_FILES):
        recipe.data.tokenizer = str(hf_dir.resolve())
    return recipe


def import_from_hf(
    hf_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: str | None = None,
    names: str = "te",
    include_mtp: bool = True,
    iteration: int = 0,
    threads: int = 4,
    overwrite: bool = False,
    progress: bool = True,
) -> ImportResult:
    """Convert the HF model in ``hf_dir`` into ``<output>/iter_<iteration>/`` plus the tracker file."""
    start = time.perf_counter()
    hf_dir = Path(hf_dir)
    arch = arch_from_hf_config(load_hf_config(hf_dir))
    if not include_mtp:
        arch = arch.replace(mtp_num_layers=0)
    hf = HFCheckpoint(hf_dir)
    table = mapping_table(arch, include_mtp and arch.mtp_num_layers > 0)
    shapes = {n: hf.shape(n) for n in hf.names()}
    if table.include_mtp and not any(n.startswith(f"model.layers.{arch.num_layers}.") for n in shapes):
        raise ConversionError(
            f"config.json has num_nextn_predict_layers={arch.mtp_num_layers} but the checkpoint holds no "
            f"model.layers.{arch.num_layers}.* (MTP) tensors; pass --no-mtp to import without MTP"
        )
    absent = check_hf(table, shapes, ignore_mtp_layers=not include_mtp)
    _check_mtp_copies(hf, table, absent)
    chunks, objects = plan_import(hf, table, parse_dtype(dtype), names)
    total = sum(math.prod(c.sizes) * c.dtype.itemsize for c in chunks)
    main_dtype = chunks[0].dtype
    iter_name = f"iter_{iteration:07d}"
    with atomic_output_dir(output, overwrite, inputs=[hf_dir]) as tmp:
        with tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="from-hf", disable=not progress
        ) as bar:
            write_dist_checkpoint(tmp / iter_name, chunks, objects, threads=threads, on_write=bar.update)
        save_resolved_recipe(recipe_for(arch, hf_dir, main_dtype, names), tmp / iter_name)
        seal(tmp / iter_name, iteration, threads)
        (tmp / TRACKER_FILE).write_text(str(iteration))
    out = Path(output).resolve()
    return ImportResult(out, out / iter_name, len(chunks), total, time.perf_counter() - start)
