"""Run under ``torchrun --nproc-per-node 2``: re-save a TP=1 checkpoint under 2-rank training layouts.

For each layout (``name:tp,pp,ep,etp``) every rank builds its part of the model, loads the source
checkpoint through Megatron's loader (resharding), and saves it back with Megatron's
``dist_checkpointing.save`` from both ranks -- a checkpoint "trained" at that layout.  Ranks with the
full tensors (TP=1) also dump their live HF-named tensors (the weight-sync API); TP layouts without
PP run a forward and compare logits with the reference the test computed with transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist


def run_layout(name: str, tp: int, pp: int, ep: int, etp: int, src: Path, out: Path, ref: dict) -> dict:
    from megatron.core import dist_checkpointing, parallel_state

    from joyai_megatron.compat import cuda_device_as_cpu
    from joyai_megatron.config.schema import ModelCfg, ParallelCfg, PrecisionCfg
    from joyai_megatron.convert.live import hf_named_tensors
    from joyai_megatron.convert.megatron_model import megatron_logits
    from joyai_megatron.model.build import build_joyai_model
    from joyai_megatron.model.config import build_transformer_config
    from joyai_megatron.model.presets import recipe_arch
    from joyai_megatron.training.checkpoint import load_model_weights
    from joyai_megatron.training.checkpoint_model import load_checkpoint_recipe

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    rank = dist.get_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    arch = recipe_arch(load_checkpoint_recipe(src))
    torch.manual_seed(rank + 7)  # different init per rank: only the loaded weights may matter
    parallel = ParallelCfg(tp=tp, pp=pp, ep=ep, etp=etp)
    model = build_joyai_model(
        build_transformer_config(arch, ModelCfg(), parallel, PrecisionCfg()),
        arch,
        "local",
        pre_process=pp_rank == 0,
        post_process=pp_rank == pp - 1,
        pp_rank=pp_rank,
    )
    load_model_weights(model, src)
    result: dict = {"layout": name, "rank": rank}
    if tp == 1:
        live = {n: t.clone() for n, t in hf_named_tensors(model, arch)}
        torch.save(live, out.parent / f"{name}.live{rank}.pt")
    if pp == 1:
        with cuda_device_as_cpu():  # Megatron's TP collectives allocate on the "current CUDA device"
            logits, _ = megatron_logits(model, ref["ids"])
        shard = logits.shape[-1]  # the output layer keeps logits vocab-parallel
        start = parallel_state.get_tensor_model_parallel_rank() * shard
        result["max_logit_diff"] = (logits - ref["logits"][..., start : start + shard]).abs().max().item()
    target = out / "iter_0000010"
    if rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        target.mkdir(parents=True)
        shutil.copy(src / "recipe.yaml", target / "recipe.yaml")
    dist.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(target))
    dist.barrier()
    if rank == 0:
        (target / "COMPLETE").write_text("10")
        (out / "latest_checkpointed_iteration.txt").write_text("10")
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--src", type=Path, required=True)
    parser.add_argument("--ref", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("layouts", nargs="+", help="name:tp,pp,ep,etp")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dist.init_process_group("gloo")
    from joyai_megatron import compat

    compat.install()
    ref = torch.load(args.ref)
    results = []
    for spec in args.layouts:
        name, sizes = spec.split(":")
        tp, pp, ep, etp = (int(x) for x in sizes.split(","))
        results.append(run_layout(name, tp, pp, ep, etp, args.src, args.out / name, ref))
    (args.out / f"result{dist.get_rank()}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
