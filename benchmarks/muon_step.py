"""Muon's optimizer step on MoE layers at JoyAI's shapes: ours against Megatron-Core's, same run.

The Muon step is a fixed cost per optimizer step that no batch size hides, and in an MoE model it is
dominated by the routed experts' matrices (``--experts`` per layer, each an fc1 of
[2 x moe_ffn, hidden] and an fc2 of [hidden, moe_ffn]). Three variants update the same parameters
from the same gradients, ``--steps`` timed steps each after ``--warmup``, Newton-Schulz in bf16
(``fp32_matmul_prec="medium"``, as in training) with Moonlight's coefficients:

* ``megatron``: Megatron-Core 0.19.2's ``TensorParallelMuon`` as it ships, one matrix at a time and
  each gated fc1 orthogonalised fused ([gate; up] as one matrix);
* ``batched-fused``: our ``BatchedMuon`` (one batched Newton-Schulz per shape), fc1 still fused;
* ``ours``: ``BatchedMuon`` with fc1 as gate and up (``optim.muon_split_fc1``, the recipes' default,
  which is Moonlight's update; see docs/pretraining.md).

Prints seconds per step and each variant's speed-up over ``megatron``; the last line is JSON.

    python benchmarks/muon_step.py                      # GPU if present: 1 layer of 256 experts
    python benchmarks/muon_step.py --experts 64         # the one-GPU proxy's layer
    python benchmarks/muon_step.py --dry-run            # CPU, small shapes, seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
from megatron.core.optimizer.emerging_optimizers import TensorParallelMuon  # noqa: E402

from joyai_megatron.optim.muon import GATED_FC1, BatchedMuon  # noqa: E402

VARIANTS = {
    "megatron": (TensorParallelMuon, False),
    "batched-fused": (BatchedMuon, False),
    "ours": (BatchedMuon, True),
}
# The recipes' Muon settings (optim.* defaults; recipes/pretrain/joyai_48b_a3b/base.yaml).
MUON = dict(lr=4.2e-4, momentum=0.95, nesterov=True, weight_decay=0.1, fp32_matmul_prec="medium",
            coefficient_type="simple", num_ns_steps=5, scale_mode="spectral", extra_scale_factor=0.2)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--experts", type=int, default=256, help="routed experts per layer")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--moe-ffn", type=int, default=768)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dry-run", action="store_true", help="CPU, 1 layer of 4 experts at 256/96 (CI)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.device, args.layers, args.experts, args.hidden, args.moe_ffn = "cpu", 1, 4, 256, 96
        args.steps, args.warmup = 2, 1
    return args


def expert_shapes(args: argparse.Namespace) -> list[tuple[tuple[int, int], bool]]:
    """(shape, is a gated fc1) of every routed-expert matrix."""
    per_expert = [((2 * args.moe_ffn, args.hidden), True), ((args.hidden, args.moe_ffn), False)]
    return per_expert * (args.experts * args.layers)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_variant(name: str, args: argparse.Namespace) -> dict[str, float]:
    """Seconds per step of one variant (median of the timed steps) on freshly seeded tensors."""
    cls, split = VARIANTS[name]
    gen = torch.Generator(device=args.device).manual_seed(0)
    params = []
    for shape, gated in expert_shapes(args):
        p = torch.nn.Parameter(torch.randn(shape, device=args.device, generator=gen) * 0.02)
        setattr(p, GATED_FC1, gated and split)
        p.grad = torch.randn(shape, device=args.device, generator=gen) * 1e-3
        params.append(p)
    optimizer = cls(params, **MUON)
    times = []
    for step in range(args.warmup + args.steps):
        synchronize(args.device)
        start = time.perf_counter()
        optimizer.step()
        synchronize(args.device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "matrices": len(params)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(
        f"== muon_step: {args.layers} layer(s) x {args.experts} experts, fc1 [{2 * args.moe_ffn}, {args.hidden}], "
        f"fc2 [{args.hidden}, {args.moe_ffn}], {args.steps} steps after {args.warmup} | {device} | torch {torch.__version__}"
    )
    results = {}
    for name in VARIANTS:
        results[name] = run_variant(name, args)
        print(f"{name:15s} {results[name]['seconds']:9.4f} s/step")
    base = results["megatron"]["seconds"]
    for name in VARIANTS:
        results[name]["speedup"] = base / results[name]["seconds"]
    print("speed-up over megatron: " + ", ".join(f"{n} {r['speedup']:.2f}x" for n, r in results.items()))
    print(json.dumps({"device": device, **{n: r for n, r in results.items()}}))
    return results


if __name__ == "__main__":
    main()
