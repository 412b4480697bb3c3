"""Check that a Megatron checkpoint and an HF directory hold the same model.

Coverage (Pai-Megatron-Patch's NaN-fill idea, streamed one layer at a time): every HF target
tensor starts as NaN; each stored Megatron tensor is pushed through the *per-parameter* mapping
(:func:`megatron_to_hf`, the path the RL weight sync uses, not the exporter's region plan) into the
targets, refusing to write a region that is no longer NaN (written twice).  Afterwards any NaN left
means a tensor was never written, any stored tensor not visited was never consumed, and each target
must equal the HF file's tensor bit for bit, with the same shape and dtype.

``logits=True`` also builds both models on CPU (Megatron through its own checkpoint loader,
transformers from the HF directory) and compares logits and greedy generations.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

import torch
from tqdm import tqdm

from joyai_megatron.convert.common import ConversionError, fmt_shape, parse_dtype
from joyai_megatron.convert.dist_ckpt import DistCkptReader, ckpt_location, resolve_iteration_dir
from joyai_megatron.convert.hf_config import arch_from_hf_config, load_hf_config
from joyai_megatron.convert.hf_io import HFCheckpoint
from joyai_megatron.convert.mapping import MappingTable, TensorMap, mapping_table, megatron_to_hf
from joyai_megatron.convert.plan import check_checkpoint, check_hf
from joyai_megatron.convert.to_hf import KEEP_FP32
from joyai_megatron.model.presets import recipe_arch
from joyai_megatron.training.checkpoint_model import load_checkpoint_recipe
from joyai_megatron.training.checkpoint_scan import verify_directory


@dataclass
class VerifyReport:
    tensors: int = 0
    bytes: int = 0
    max_logit_diff: float | None = None
    greedy_match: bool | None = None
    notes: list[str] = field(default_factory=list)


def _fill(targets: dict[str, torch.Tensor], hf_name: str, value: torch.Tensor, source: str) -> None:
    if hf_name not in targets:
        raise ConversionError(f"{source} maps to {hf_name}, which is not a target of this layer")
    target = targets[hf_name]
    if not torch.isnan(target).all():
        raise ConversionError(f"{hf_name} written twice (again from {source})")
    target.copy_(value)


def _group_targets(
    rows: list[TensorMap], reader: DistCkptReader, stored: dict[str, list[str]]
) -> dict[str, torch.Tensor]:
    targets = {}
    for row in rows:
        key, _ = ckpt_location(stored[row.megatron][0])
        dtype = reader.tensors[key].dtype
        for name, shape in [
            *zip(row.hf, row.hf_shapes, strict=True),
            *((c, row.megatron_shape) for c in row.copies),
        ]:
            targets[name] = torch.full(shape, float("nan"), dtype=dtype)
    return targets


def _read_param(reader: DistCkptReader, name: str, cache: dict[str, torch.Tensor]) -> torch.Tensor:
    key, expert = ckpt_location(name)
    if key not in cache:
        cache[key] = reader.read(key)
    return cache[key] if expert is None else cache[key][expert]


def check_coverage(
    reader: DistCkptReader,
    hf: HFCheckpoint,
    table: MappingTable,
    *,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> VerifyReport:
    """NaN-fill coverage plus bitwise comparison; raises :class:`ConversionError` on the first problem."""
    stored = check_checkpoint(table, reader.tensors, ignore_mtp=not table.include_mtp)
    absent_copies = check_hf(
        table, {n: hf.shape(n) for n in hf.names()}, ignore_mtp_layers=not table.include_mtp
    )
    report = VerifyReport()
    if absent_copies:
        report.notes.append(
            f"HF side lacks the MTP copies {absent_copies} (optional for import, written by export)"
        )
    visited_keys: set[str] = set()
    visited_hf: set[str] = set()
    groups = [list(g) for _, g in groupby(table.rows, key=lambda r: r.layer)]
    bar = tqdm(groups, desc="verify", unit="layer", disable=not progress)
    for rows in bar:
        targets = _group_targets(rows, reader, stored)
        cache: dict[str, torch.Tensor] = {}
        for row in rows:
            first, *others = stored[row.megatron]
            value = _read_param(reader, first, cache)
            for hf_name, part in megatron_to_hf(row.megatron, value, table.arch, table.include_mtp):
                _fill(targets, hf_name, part, first)
            for other in others:  # the same tensor under the other backend's name
                if not torch.equal(_read_param(reader, other, cache), value):
                    raise ConversionError(f"{first} and {other} name one tensor but differ")
            visited_keys.update(ckpt_location(n)[0] for n in stored[row.megatron])
        for name, target in targets.items():
            if torch.isnan(target).any():
                raise ConversionError(f"{name}: never written (or NaN in the Megatron checkpoint)")
            if name in absent_copies:
                continue
            want = target if dtype is None or name.endswith(KEEP_FP32) else target.to(dtype)
            if hf.dtype(name) != want.dtype:
                raise ConversionError(f"{name}: HF dtype {hf.dtype(name)}, expected {want.dtype}")
            got = hf.get(name)
            if tuple(got.shape) != tuple(want.shape):
                raise ConversionError(
                    f"{name}: HF shape {fmt_shape(got.shape)}, expected {fmt_shape(want.shape)}"
                )
            if not torch.equal(got, want):
                diff = (got.float() - want.float()).abs().max().item()
                raise ConversionError(
                    f"{name}: values differ from the Megatron checkpoint (max abs diff {diff:.3g})"
                )
            visited_hf.add(name)
            report.tensors += 1
            report.bytes += got.numel() * got.element_size()
    unused = sorted(
        k
        for k in reader.model_keys()
        if k not in visited_keys and (table.include_mtp or not k.startswith("mtp."))
    )
    if unused:
        raise ConversionError(f"Megatron tensor {unused[0]} was never consumed ({len(unused)} unused)")
    mtp_first = table.arch.num_layers
    extra = sorted(
        n
        for n in set(hf.names()) - visited_hf
        if table.include_mtp
        or not n.startswith(tuple(f"model.layers.{i}." for i in range(mtp_first, mtp_first + 8)))
    )
    if extra:
        raise ConversionError(f"HF tensor {extra[0]} was never matched ({len(extra)} unmatched)")
    return report


def load_hf_model(hf_dir: str | Path) -> torch.nn.Module:
    """transformers' DeepseekV3 from an export, fp32, eval mode, without its load report: the MTP
    layer our exports write at layer N is "unexpected" to transformers, by design."""
    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    finally:
        hf_logging.set_verbosity(verbosity)


def compare_logits(
    iter_dir: Path,
    hf_dir: Path,
    table: MappingTable,
    *,
    batch: int = 2,
    seq: int = 16,
    new_tokens: int = 20,
    seed: int = 0,
) -> tuple[float, bool]:
    """(max |logits_megatron - logits_hf|, greedy generations equal) on random prompts, fp32 CPU."""
    from joyai_megatron.convert.megatron_model import megatron_greedy, megatron_logits
    from joyai_megatron.training.checkpoint import load_model_weights
    from joyai_megatron.training.checkpoint_model import build_megatron_model, init_single_process

    init_single_process()
    model = build_megatron_model(table.arch, mtp=table.include_mtp)
    load_model_weights(model, iter_dir)
    hf_model = load_hf_model(hf_dir)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, table.arch.vocab_size, (batch, seq), generator=gen)
    meg, _ = megatron_logits(model, ids)
    with torch.no_grad():
        ref = hf_model(ids).logits
        hf_tokens = hf_model.generate(
            ids,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[:, seq:]
    meg_tokens = megatron_greedy(model, ids, new_tokens)
    return (meg - ref).abs().max().item(), bool(torch.equal(meg_tokens, hf_tokens))


def verify(
    checkpoint: str | os.PathLike,
    hf_dir: str | os.PathLike | None,
    *,
    include_mtp: bool = True,
    dtype: str | None = None,
    logits: bool = False,
    logits_tolerance: float = 1e-4,
    progress: bool = True,
) -> VerifyReport:
    """Verify that ``hf_dir`` is the HF form of ``checkpoint``; raises on the first problem.

    Both directories' files are first checked against their ``checksums.json`` (``hf_dir=None``:
    only that check, of the checkpoint).
    """
    iter_dir = resolve_iteration_dir(checkpoint)
    notes = [n for d in (iter_dir, hf_dir) if d is not None and (n := verify_directory(Path(d)))]
    if hf_dir is None:
        return VerifyReport(notes=notes)
    arch = recipe_arch(load_checkpoint_recipe(iter_dir))
    hf_arch = arch_from_hf_config(load_hf_config(hf_dir))
    include_mtp = include_mtp and arch.mtp_num_layers > 0 and hf_arch.mtp_num_layers > 0
    mismatched = [
        f
        for f in (
            "hidden_size",
            "num_layers",
            "num_experts",
            "vocab_size",
            "ffn_hidden_size",
            "moe_ffn_hidden_size",
            "num_attention_heads",
            "q_lora_rank",
            "kv_lora_rank",
            "rotary_base",
            "routed_scaling_factor",
            "moe_router_topk",
            "first_k_dense",
        )
        if getattr(arch, f) != getattr(hf_arch, f)
    ]
    if mismatched:
        f = mismatched[0]
        raise ConversionError(
            f"config.json and recipe.yaml disagree on {f}: {getattr(hf_arch, f)} vs {getattr(arch, f)}"
        )
    table = mapping_table(arch, include_mtp)
    report = check_coverage(
        DistCkptReader(iter_dir), HFCheckpoint(hf_dir), table, dtype=parse_dtype(dtype), progress=progress
    )
    report.notes[:0] = notes
    if logits:
        diff, same = compare_logits(iter_dir, Path(hf_dir), table)
        report.max_logit_diff, report.greedy_match = diff, same
        if diff > logits_tolerance or not same:
            raise ConversionError(
                f"logits differ by {diff:.3g} (tolerance {logits_tolerance:g}); greedy generations "
                f"{'match' if same else 'differ'}"
            )
    return report
