"""One-GPU training throughput: our trainer core vs ``transformers.DeepseekV3ForCausalLM``.

Ours: ``Trainer`` + ``PretrainStage`` on the ``joyai_proxy_1gpu`` preset (real per-layer shapes, 6
layers, 64 experts, dense MTP), ``local`` backend (SDPA attention; grouped-GEMM experts unless
``--experts sequential``), Muon with fp32 master weights. Baseline: the same shapes as a
transformers model (no MTP: transformers has none) in bf16 with ``torch.optim.AdamW``, the same
token batches (Megatron's mock dataset, or ``--data``), the same global batch by gradient
accumulation. Each part runs in its own process, so peak memory and failures stay separate; a bf16
matmul timed first gives the peak for MFU. FLOPs per token come from
``joyai_megatron.model.count.flops_per_token`` (the baseline counted without MTP).

    python benchmarks/train_throughput.py                      # GPU: prints the table at the end
    # (default parts: te-torch-experts-fused-no-mtp,te-torch-experts,baseline with Transformer Engine,
    #  ours,baseline without it)
    python benchmarks/train_throughput.py --profile            # plus the top device-time sinks
    python benchmarks/train_throughput.py --data runs/demo/data --steps 100 --parts ours
    python benchmarks/train_throughput.py --dry-run            # CPU, tiny preset, seconds (CI)
    # time to a validation loss on real text: ours (recipe LR) vs the baseline at three LRs
    python benchmarks/train_throughput.py --data runs/demo/data --warmup 0 --steps 300 --val-every 20 \
        --parts ours-no-mtp,baseline@3e-4,baseline@1e-3,baseline@3e-3

A part name may end in ``@LR`` (that part at learning rate LR). With ``--val-every K`` each part
also records its validation loss on the first ``--val-rows`` rows of the data's validation split
every K steps (not timed); the report then gives every part's tokens and training seconds to the
highest loss all parts reach, and ours against the best baseline, on the wall clock and on a steady
clock that charges the first timed step (one-time compilation and autotuning) at the mean step.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Run as a script, sys.path[0] is benchmarks/, whose data_prep.py would shadow the package.
sys.path[0] = str(REPO)

import torch  # noqa: E402

RESULT = "RESULT "
# The fastest configuration measured on one GPU (docs/benchmarks.md, 2026-12-05): Transformer Engine
# for attention, norms and dense linears; PyTorch's grouped GEMM for the routed experts behind the
# sync-free allgather dispatch (TE's grouped GEMM makes the host wait once per MoE layer); fused
# SwiGLU.  Each is checked against the path it replaces (tests/gpu/test_te_fusions_gpu.py,
# tests/benchmarks/test_fast_paths.py).
TORCH_EXPERTS = ["model.moe_grouped_gemm_impl=torch", "model.bias_activation_fusion=true"]
_TE_TORCH_EXPERTS = {"backend": "te", "dispatcher": "allgather", "part_set": TORCH_EXPERTS}
# TE's fused sigmoid top-k router and its fused cross-entropy on top (same expert choices, losses and
# gradients without MTP: tests/gpu/test_te_fusions_gpu.py, passed on an H100 on 2026-12-05).
FUSED = [*TORCH_EXPERTS, "model.moe_router_fusion=true", "model.cross_entropy_fusion_impl=te"]
_TE_FUSED = {**_TE_TORCH_EXPERTS, "part_set": FUSED}


def _fp8(part: dict[str, Any]) -> dict[str, Any]:
    """``part`` with FP8 blockwise for TE's linears; the PyTorch-grouped experts stay BF16 (no FP8
    token padding)."""
    return {
        **part,
        "fp8_recipe": "blockwise",
        "part_set": [*part["part_set"], "model.moe_router_padding_for_fp8=false"],
    }


PARTS = {
    # name -> (runner, overrides of the parsed arguments)
    "ours": ("ours", {}),
    "ours-no-mtp": ("ours", {"mtp": False}),
    "ours-sequential": ("ours", {"experts": "sequential"}),
    # The production path: Transformer Engine (fused attention, TE grouped GEMMs, fused permutation),
    # BF16 and each FP8 scaling recipe (E4M3, experts' token counts padded for FP8).
    "te": ("ours", {"backend": "te"}),
    "te-no-mtp": ("ours", {"backend": "te", "mtp": False}),
    "te-fp8-blockwise": ("ours", {"backend": "te", "fp8_recipe": "blockwise"}),
    "te-fp8-tensorwise": ("ours", {"backend": "te", "fp8_recipe": "tensorwise"}),
    "te-fp8-delayed": ("ours", {"backend": "te", "fp8_recipe": "delayed"}),
    "te-torch-experts": ("ours", _TE_TORCH_EXPERTS),
    "te-torch-experts-no-mtp": ("ours", {**_TE_TORCH_EXPERTS, "mtp": False}),
    "te-torch-experts-fp8": ("ours", _fp8(_TE_TORCH_EXPERTS)),
    "te-torch-experts-fused": ("ours", _TE_FUSED),
    "te-torch-experts-fused-no-mtp": ("ours", {**_TE_FUSED, "mtp": False}),
    "te-torch-experts-fused-fp8": ("ours", _fp8(_TE_FUSED)),
    "te-torch-experts-fused-fp8-no-mtp": ("ours", {**_fp8(_TE_FUSED), "mtp": False}),
    "baseline": ("baseline", {}),
    "baseline-eager": ("baseline", {"baseline_experts": "eager"}),
}


TORCH_EXPERT_PARTS = [name for name in PARTS if name.startswith("te-torch-experts")]


def default_parts() -> str:
    """The fastest configuration of ours where it can run (a GPU with Transformer Engine), with and
    without MTP, against the baseline; the local backend elsewhere.  With MTP the router and loss
    stay unfused: the GPU equivalence test of those fusions covers the model without MTP only."""
    te = importlib.util.find_spec("transformer_engine") is not None
    if te and torch.cuda.is_available():
        return "te-torch-experts-fused-no-mtp,te-torch-experts,baseline"
    return "ours,baseline"


def part_and_lr(name: str) -> tuple[str, float | None]:
    """``"baseline@1e-3"`` -> ``("baseline", 0.001)``; a plain name has no learning rate of its own."""
    part, _, lr = name.partition("@")
    try:
        return part, float(lr) if lr else None
    except ValueError:
        return name, None


DRY_RUN = {
    "device": "cpu",
    "preset": "tiny",
    "dtype": "fp32",  # Megatron's bf16 optimizer asserts CUDA tensors
    "seq_length": 128,
    "global_batch": 2,
    "micro_batch": 1,
    "steps": 2,
    "warmup": 1,
    "matmul_size": 256,
    "profile_steps": 1,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--preset", default="joyai_proxy_1gpu")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=4)
    # 36 x 4096 tokens: one GPU's share of JoyAI's ~38M-token batch on 256 GPUs.
    p.add_argument("--global-batch", type=int, default=36, help="sequences per optimizer step")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--recompute", choices=("none", "selective", "full"), default="none")
    p.add_argument("--experts", choices=("grouped", "sequential"), default="grouped")
    p.add_argument("--baseline-experts", choices=("grouped_mm", "eager"), default="grouped_mm")
    p.add_argument("--no-mtp", dest="mtp", action="store_false", help="ours without the MTP block")
    p.add_argument("--documents", action="store_true", help="per-document attention (ours only)")
    p.add_argument("--backend", choices=("local", "te"), default="local", help="ours: model.backend")
    p.add_argument(
        "--dispatcher",
        choices=("allgather", "alltoall"),
        help="ours: MoE token dispatcher (default: te alltoall)",
    )
    p.add_argument("--fp8-recipe", default=None, help="ours with te: E4M3 FP8 with this scaling recipe")
    p.add_argument("--fp8-param-gather", action="store_true", help="ours with FP8: FP8 weights too")
    p.add_argument("--data", help="demo data dir (tokenizer/, blend.yaml) instead of mock tokens")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="ours: a recipe override (repeatable), e.g. model.bias_activation_fusion=true",
    )
    p.add_argument("--lr", type=float, default=4.2e-4)
    parts = default_parts()
    p.add_argument(
        "--parts",
        default=parts,
        help=f"comma list of {sorted(PARTS)}, each may end in @LR (default: {parts})",
    )
    p.add_argument(
        "--val-every", type=int, default=0, help="validation loss every K timed steps (needs --data)"
    )
    p.add_argument(
        "--val-rows", type=int, default=32, help="validation rows (from the data's validation split)"
    )
    p.add_argument("--profile", action="store_true", help="profile a few steps after the timed ones")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--matmul-size", type=int, default=8192)
    p.add_argument("--out-dir", default="runs/benchmarks/train_throughput")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny preset, a few steps (CI)")
    p.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this process
    args = p.parse_args(argv)
    if args.dry_run:
        for key, value in DRY_RUN.items():
            setattr(args, key, value)
    unknown = [x for x in args.parts.split(",") if part_and_lr(x)[0] not in PARTS]
    if unknown:
        p.error(f"--parts: unknown {unknown}; choose from {sorted(PARTS)}")
    if args.global_batch % args.micro_batch:
        p.error(f"--global-batch {args.global_batch} is not a multiple of --micro-batch {args.micro_batch}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available (use --dry-run or --device cpu)")
    if args.val_every and not args.data:
        p.error("--val-every needs --data (a validation split of real text; mock tokens have none)")
    if args.data and not (Path(args.data) / "blend.yaml").is_file():
        p.error(
            f"--data {args.data}: no blend.yaml there (run `python -m data_prep demo --output {args.data}`)"
        )
    return args


# --- measurement helpers -------------------------------------------------------------------------
def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak_tflops(device: str, n: int, dtype: torch.dtype = torch.bfloat16) -> float:
    """Achieved TFLOP/s of an n^3 matmul on random data: the ceiling MFU is measured against."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(3):
        a @ b
    synchronize(device)
    reps = 20 if device == "cuda" else 3
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def reset_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: str) -> float:
    """Peak allocated device memory (CUDA), or the process's peak RSS on the CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed_steps(args: argparse.Namespace, step: Any, validate: Any = None) -> dict[str, Any]:
    """Warm-up, then timed steps of ``step() -> loss`` (with ``--val-every``, ``validate() -> loss``
    between them, outside the clock); then one step timed per phase (with a device sync around
    each phase) and, if asked, the profiled steps."""
    losses = [step() for _ in range(args.warmup)]
    curve: list[dict[str, float]] = []
    elapsed = first_step = 0.0
    synchronize(args.device)
    start = time.perf_counter()
    for i in range(1, args.steps + 1):
        losses.append(step())
        if i == 1:  # one-time costs (compilation, autotuning) land here when nothing warmed up
            synchronize(args.device)
            first_step = time.perf_counter() - start  # nothing was validated yet: elapsed is 0
        if args.val_every and i % args.val_every == 0:
            synchronize(args.device)
            elapsed += time.perf_counter() - start
            tokens = (args.warmup + i) * args.global_batch * args.seq_length
            curve.append(
                {"step": args.warmup + i, "tokens": tokens, "seconds": elapsed, "val_loss": validate()}
            )
            synchronize(args.device)
            start = time.perf_counter()
    synchronize(args.device)
    elapsed += time.perf_counter() - start
    result: dict[str, Any] = {"elapsed_s": elapsed, "first_step_s": first_step, "losses": losses}
    if curve:
        result["curve"] = steady_clock(curve, first_step, elapsed, args.steps)
    PHASE_CLOCK.update(device=args.device, seconds={})
    try:
        step()
    finally:
        result["phases_s"], PHASE_CLOCK["seconds"] = PHASE_CLOCK["seconds"], None
    if args.profile:
        result["profile"] = profile_steps(args, step)
    return result


def steady_clock(
    curve: list[dict[str, float]], first_step: float, elapsed: float, steps: int
) -> list[dict[str, float]]:
    """Add ``steady_seconds`` to each validation point: its training seconds with the first timed
    step charged at the mean of the others.  Without warm-up the first step carries one-time costs
    (kernel compilation, autotuning, allocator growth) that a real run pays once in hours; a toy
    horizon of seconds would otherwise measure them rather than training speed."""
    if steps < 2:
        return [{**point, "steady_seconds": point["seconds"]} for point in curve]
    typical = (elapsed - first_step) / (steps - 1)
    return [{**point, "steady_seconds": point["seconds"] - first_step + typical} for point in curve]


PHASE = "phase: "
# While "seconds" is a dict, phases synchronise the device and add their wall time to it.
PHASE_CLOCK: dict[str, Any] = {"device": "cpu", "seconds": None}


def phase(fn: Any, name: str) -> Any:
    """``fn`` inside a profiler range (so profiles split a step into forward-backward and
    optimizer), and timed when ``PHASE_CLOCK`` is on; otherwise it costs microseconds."""

    def labelled(*args: Any, **kwargs: Any) -> Any:
        clock = PHASE_CLOCK["seconds"]
        if clock is not None:
            synchronize(PHASE_CLOCK["device"])
            start = time.perf_counter()
        with torch.profiler.record_function(PHASE + name):
            out = fn(*args, **kwargs)
        if clock is not None:
            synchronize(PHASE_CLOCK["device"])
            clock[name] = clock.get(name, 0.0) + time.perf_counter() - start
        return out

    return labelled


def profile_steps(args: argparse.Namespace, step: Any, top: int = 25) -> dict[str, Any]:
    """Operators by self device time (kernels attributed to the op that launched them), the
    busiest kernels, operators by self host time (where a host-bound step's wall time goes), and
    the device-busy share of wall time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = args.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    synchronize(args.device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(args.profile_steps):
            step()
        synchronize(args.device)
    wall_ms = (time.perf_counter() - start) * 1e3 / args.profile_steps
    self_attr = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    events = list(prof.key_averages())
    ranges = {e.key for e in events if e.device_type == DeviceType.CPU}  # ops and labelled ranges
    ops = [e for e in events if e.device_type == DeviceType.CPU and not e.key.startswith(PHASE)]
    # GPU-side copies of CPU ranges (user annotations) are not kernels: they would count twice.
    kernels = [e for e in events if e.device_type != DeviceType.CPU and e.key not in ranges]
    busy = sum(getattr(e, self_attr) for e in (kernels if on_gpu else ops)) / 1e3 / args.profile_steps

    def rows(items: list, attr: str, key: str, total_ms: float) -> list[dict[str, Any]]:
        items = sorted(
            (e for e in items if getattr(e, attr) > 0), key=lambda e: getattr(e, attr), reverse=True
        )
        return [
            {
                key: e.key,
                "ms_per_step": getattr(e, attr) / 1e3 / args.profile_steps,
                "share": getattr(e, attr) / 1e3 / args.profile_steps / total_ms,
                "calls_per_step": e.count / args.profile_steps,
            }
            for e in items[:top]
        ]

    return {
        "top": rows(ops, self_attr, "op", busy),
        "kernels": rows(kernels, self_attr, "kernel", busy),
        "host": rows(ops, "self_cpu_time_total", "op", wall_ms),  # share of the step's wall time
        "busy_ms_per_step": busy,
        "wall_ms_per_step": wall_ms,
    }


# --- the two trainers ----------------------------------------------------------------------------
def bench_recipe(args: argparse.Namespace, out_dir: Path, train_iters: int) -> Path:
    """The recipe YAML our part trains (written beside the results, loaded like any recipe)."""
    import yaml

    data: dict[str, Any] = {"mock": True, "reset_position_ids": args.documents}
    if args.data:
        data = {
            "tokenizer": f"{args.data}/tokenizer",
            "blend": f"{args.data}/blend.yaml",
            "cache_dir": str(out_dir / "cache"),
            "reset_position_ids": args.documents,
        }
    recipe = {
        "name": "bench_train_throughput",
        "stage": "pretrain",
        "model": {
            "preset": args.preset,
            "backend": args.backend,
            "mtp_enabled": args.mtp,
            "moe_grouped_gemm": args.experts == "grouped",
            # te: the 48B recipes' dispatcher (FP8's router padding needs it: Megatron-Core refuses
            # padding with allgather, found when every FP8 part died at config build on an H200).
            "moe_token_dispatcher": args.dispatcher or ("alltoall" if args.backend == "te" else "allgather"),
            "moe_router_padding_for_fp8": bool(args.fp8_recipe),
            "recompute": args.recompute,
        },
        "parallel": {"distributed_optimizer": False},
        "precision": {
            "dtype": args.dtype,
            "fp8": "e4m3" if args.fp8_recipe else None,
            "fp8_recipe": args.fp8_recipe or "blockwise",
            "fp8_param_gather": bool(args.fp8_recipe) and args.fp8_param_gather,
        },
        "train": {
            "seq_length": args.seq_length,
            "micro_batch_size": args.micro_batch,
            "global_batch_size": args.global_batch,
            "train_iters": train_iters,
            "eval_interval": 0,
        },
        "optim": {"optimizer": "muon", "lr": args.lr, "min_lr": args.lr},
        "scheduler": {"warmup_tokens": 0, "decay_style": "constant"},
        "data": data,
        "checkpoint": {"dir": str(out_dir / "ckpt"), "save_interval": 0},
        "logging": {"dir": str(out_dir / "logs"), "interval": 1, "tensorboard": False},
    }
    path = out_dir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_ours(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Our trainer core, one ``train_step`` per step (no checkpoint: a 2B model's is tens of GB)."""
    from joyai_megatron.config.recipe import load_recipe
    from joyai_megatron.model.count import flops_per_token
    from joyai_megatron.stages.pretrain import PretrainStage
    from joyai_megatron.training.distributed import shutdown
    from joyai_megatron.training.trainer import Trainer, recipe_arch

    iters = args.warmup + args.steps + 1 + (args.profile_steps if args.profile else 0)
    recipe = load_recipe(bench_recipe(args, out_dir, iters), args.set)
    reset_memory(args.device)
    trainer = Trainer(recipe, PretrainStage)
    trainer.run_microbatches = phase(trainer.run_microbatches, "forward-backward")
    trainer.optimizer.step = phase(trainer.optimizer.step, "optimizer")
    rows = validation_batches(args, out_dir) if args.val_every else []
    try:
        result = timed_steps(
            args, lambda: trainer.train_step()["lm_loss"], lambda: ours_loss(trainer.model[0], rows)
        )
    finally:
        shutdown()
    result["flops_per_token"] = flops_per_token(recipe_arch(recipe), args.seq_length, mtp=args.mtp)
    fp8 = f", FP8 {args.fp8_recipe}" if args.fp8_recipe else ""
    result["what"] = (
        f"Trainer+PretrainStage, {args.backend}{fp8}, Muon lr {args.lr:g}, {'MTP' if args.mtp else 'no MTP'}, "
        f"{args.experts} experts" + "".join(f", {override}" for override in args.set)
    )
    return result


def ours_loss(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """Mean next-token cross-entropy of our model (the GPTModel inside DDP and Float16Module) on
    ``batches``, computed as transformers computes the baseline's (logits shifted by one)."""
    from joyai_megatron.convert.megatron_model import megatron_logits
    from joyai_megatron.training.checkpoint import unwrap

    model = unwrap(model)
    losses = []
    with torch.no_grad():
        for tokens in batches:
            logits, _ = megatron_logits(model, tokens)
            losses.append(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten()
                )
            )
    model.train()
    return float(torch.stack(losses).mean())


def baseline_loss(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=tokens, labels=tokens).loss.float() for tokens in batches]
    model.train()
    return float(torch.stack(losses).mean())


def hf_model(args: argparse.Namespace) -> torch.nn.Module:
    """The preset as ``DeepseekV3ForCausalLM`` (config written by our converter), built in place."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from joyai_megatron.convert.hf_config import arch_to_hf_config
    from joyai_megatron.model.presets import get_preset

    cfg = arch_to_hf_config(get_preset(args.preset), include_mtp=False)
    cfg.pop("torch_dtype")
    config = DeepseekV3Config(**cfg)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    config._experts_implementation = args.baseline_experts  # older transformers: no such kwarg
    with torch.device(args.device):
        model = DeepseekV3ForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    if args.recompute == "full":
        model.gradient_checkpointing_enable()
    return model.train()


def token_batches(
    args: argparse.Namespace, out_dir: Path, count: int, split: str = "train"
) -> list[torch.Tensor]:
    """``count`` micro-batches of the rows our part trains on (or of the validation split), from
    the same dataset class and seed."""
    from joyai_megatron.config.recipe import load_recipe
    from joyai_megatron.stages.pretrain import PretrainStage

    stage = PretrainStage(load_recipe(bench_recipe(args, out_dir, 1), args.set))
    rows_wanted = count * args.micro_batch
    samples = {"train": 1, "valid": 1, split: rows_wanted}  # index only the split that is read
    data = stage.build_datasets(samples["train"], samples["valid"])[split]
    rows = [torch.as_tensor(data[i]["tokens"]) for i in range(rows_wanted)]
    return [torch.stack(rows[i : i + args.micro_batch]) for i in range(0, len(rows), args.micro_batch)]


def validation_batches(args: argparse.Namespace, out_dir: Path) -> list[torch.Tensor]:
    """The first ``--val-rows`` rows of the validation split, on the device, in micro-batches."""
    count = max(1, args.val_rows // args.micro_batch)
    return [b.to(args.device) for b in token_batches(args, out_dir, count, "valid")]


def run_baseline(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """transformers + plain PyTorch AdamW (bf16 weights and states), gradient accumulation."""
    import transformers

    from joyai_megatron.model.count import flops_per_token
    from joyai_megatron.model.presets import get_preset

    accum = args.global_batch // args.micro_batch
    iters = args.warmup + args.steps + 1 + (args.profile_steps if args.profile else 0)
    batches = [b.to(args.device) for b in token_batches(args, out_dir, iters * accum)]
    reset_memory(args.device)
    torch.manual_seed(1234)
    model = hf_model(args)
    opt = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=args.device == "cuda"
    )
    cursor = iter(batches)

    def forward_backward() -> torch.Tensor:
        total = torch.zeros((), device=args.device)
        for _ in range(accum):
            tokens = next(cursor)
            loss = model(input_ids=tokens, labels=tokens).loss  # transformers shifts the labels
            (loss / accum).backward()
            total += loss.detach() / accum
        return total

    def optimizer_step() -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    forward_backward = phase(forward_backward, "forward-backward")
    optimizer_step = phase(optimizer_step, "optimizer")

    def step() -> float:
        total = forward_backward()
        optimizer_step()
        return float(total)

    rows = validation_batches(args, out_dir) if args.val_every else []
    result = timed_steps(args, step, lambda: baseline_loss(model, rows))
    experts = getattr(model.config, "_experts_implementation", None) or "eager"
    result["flops_per_token"] = flops_per_token(get_preset(args.preset), args.seq_length, mtp=False)
    result["what"] = (
        f"transformers {transformers.__version__} DeepseekV3ForCausalLM, AdamW lr {args.lr:g}, {experts} experts"
    )
    return result


def apply_part(args: argparse.Namespace, name: str) -> str:
    """Set ``args`` as part ``name`` runs; returns its runner.  A part's own recipe overrides come
    before ``--set``'s, so the command line wins."""
    runner, overrides = PARTS[name]
    for key, value in overrides.items():
        if key == "part_set":
            args.set = [*value, *args.set]
        else:
            setattr(args, key, value)
    return runner


def run_part(args: argparse.Namespace) -> dict[str, Any]:
    name, lr = part_and_lr(args.part)
    runner = apply_part(args, name)
    if lr is not None:
        args.lr = lr
    out_dir = Path(args.out_dir) / args.part
    out_dir.mkdir(parents=True, exist_ok=True)
    result = (run_ours if runner == "ours" else run_baseline)(args, out_dir)
    tokens = args.steps * args.global_batch * args.seq_length
    result.update(
        part=args.part,
        tokens_per_s=tokens / result["elapsed_s"],
        step_s=result["elapsed_s"] / args.steps,
        peak_mem_gib=peak_memory_gib(args.device),
    )
    result["tflops"] = result["tokens_per_s"] * result["flops_per_token"] / 1e12
    return result


# --- orchestration and report --------------------------------------------------------------------
def spawn_part(argv: list[str], part: str) -> dict[str, Any]:
    """Run one part in a child process (its own CUDA context and peak memory); parse its result."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--part", part]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO
    )
    result: dict[str, Any] = {"part": part, "error": "exited without a result (see the log above)"}
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(RESULT):
            result = json.loads(line[len(RESULT) :])
        elif not any(noise in line for noise in ("warnings.warn", "Warning:", "DEPRECATED")):
            print(f"  [{part}] {line}", end="", flush=True)
    if proc.wait() != 0 and "tokens_per_s" not in result:
        result["error"] = f"exit code {proc.returncode}"
    return result


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import megatron.core
    import transformers

    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return {
        "device": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "megatron_core": megatron.core.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def report(args: argparse.Namespace, env: dict[str, Any], peak: float, results: list[dict]) -> str:
    lines = [
        f"== train_throughput: {args.preset}, {args.dtype}, seq {args.seq_length} x global batch "
        f"{args.global_batch} (micro {args.micro_batch}), recompute {args.recompute}, "
        f"{args.steps} timed steps after {args.warmup} warm-up ==",
        f"device {env['device']} | torch {env['torch']} | transformers {env['transformers']} | "
        f"megatron-core {env['megatron_core']} | {env['date']}",
        f"{args.dtype} matmul peak ({args.matmul_size}^3, measured): {peak:.1f} TFLOP/s",
        f"{'part':<16}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'step s':>8}{'peak GiB':>9}  loss first -> last",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"{r['part']:<16} FAILED: {r['error']}")
            continue
        mfu = r["tflops"] / peak
        lines.append(
            f"{r['part']:<16}{r['tokens_per_s']:>11,.0f}{r['tflops']:>9.1f}{mfu:>7.1%}{r['step_s']:>8.3f}"
            f"{r['peak_mem_gib']:>9.1f}  {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}   ({r['what']})"
        )
    done = {r["part"]: r for r in results if "error" not in r}
    if "te" in done:
        for name, r in done.items():
            if name.startswith("te-fp8"):
                lines.append(
                    f"ratio {name}/te: tokens/s {r['tokens_per_s'] / done['te']['tokens_per_s']:.2f}x"
                )
    for ours in ("ours", "ours-no-mtp", "ours-sequential", "te", "te-no-mtp", *TORCH_EXPERT_PARTS):
        for base in ("baseline", "baseline-eager"):
            if ours in done and base in done:
                a, b = done[ours], done[base]
                lines.append(
                    f"ratio {ours}/{base}: tokens/s {a['tokens_per_s'] / b['tokens_per_s']:.2f}x, "
                    f"TFLOP/s {a['tflops'] / b['tflops']:.2f}x"
                )
    lines += time_to_loss(results)
    for r in results:
        if "phases_s" in r:
            phases = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in r["phases_s"].items())
            lines.append(f"phases of one {r['part']} step (device synced around each): {phases}")
    for r in results:
        prof = r.get("profile")
        if not prof:
            continue
        lines.append(
            f"profile of {r['part']} per step: wall {prof['wall_ms_per_step']:.1f} ms (profiler on), "
            f"kernels {prof['busy_ms_per_step']:.1f} ms"
        )
        for title, table, key in (
            ("ops by self device time", "top", "op"),
            ("kernels", "kernels", "kernel"),
            ("ops by self host time (share of wall time)", "host", "op"),
        ):
            lines.append(f"  top {title}:")
            for i, row in enumerate(prof.get(table, [])[:5], 1):
                lines.append(
                    f"   {i}. {row[key][:78]:<78} {row['ms_per_step']:>8.1f} ms {row['share']:>6.1%} "
                    f"{row['calls_per_step']:>6.0f} calls"
                )
    return "\n".join(lines)


def time_to_loss(results: list[dict]) -> list[str]:
    """Tokens and training seconds each part took to reach the highest validation loss that every
    part reached, and ours (fastest of our parts) against the best baseline: on the wall clock, and
    on the steady clock (the first step's one-time costs removed, ``steady_clock``)."""
    runs = {r["part"]: r for r in results if r.get("curve")}
    if not runs:
        return []
    target = max(min(p["val_loss"] for p in r["curve"]) for r in runs.values())
    lines = [f"time to validation loss {target:.4f} (the highest loss every part reached):"]
    reached = {}
    for part, run in runs.items():
        curve = run["curve"]
        point = next(p for p in curve if p["val_loss"] <= target)
        reached[part] = point
        trail = " -> ".join(f"{p['val_loss']:.3f}" for p in curve[:: max(1, len(curve) // 6)])
        steady = point.get("steady_seconds", point["seconds"])
        first = run.get("first_step_s")
        first_s = f", first step {first:.1f} s" if first is not None else ""
        lines.append(
            f"  {part:<22} step {point['step']:>5}  {point['tokens']:>12,} tokens  {point['seconds']:>8.1f} s"
            f"  steady {steady:>7.1f} s{first_s}"
            f"   (validation loss {trail} -> {curve[-1]['val_loss']:.3f})"
        )
    ours = {k: v for k, v in reached.items() if not k.startswith("baseline")}
    bases = {k: v for k, v in reached.items() if k.startswith("baseline")}
    if ours and bases:
        for clock, label in (("steady_seconds", "steady clock"), ("seconds", "wall clock")):
            secs = {k: v.get(clock, v["seconds"]) for k, v in reached.items()}
            o = min(ours, key=secs.__getitem__)
            b = min(bases, key=secs.__getitem__)
            lines.append(
                f"ratio time-to-loss {o}/{b} (best baseline, {label}): seconds {secs[o] / secs[b]:.2f}x, "
                f"tokens {ours[o]['tokens'] / bases[b]['tokens']:.2f}x"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    if args.part:
        print(RESULT + json.dumps(run_part(args)), flush=True)
        return 0
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(args)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    peak = matmul_peak_tflops(args.device, args.matmul_size, dtype)
    if args.device == "cuda":
        torch.cuda.empty_cache()
    results = []
    for part in args.parts.split(","):
        results.append(spawn_part(raw, part))
        # Written after every part, so a run cut short still leaves what it measured.
        (out_dir / "results.json").write_text(
            json.dumps(
                {"args": vars(args), "env": env, "matmul_peak_tflops": peak, "results": results}, indent=1
            )
        )
        print("done: " + report(args, env, peak, results[-1:]).splitlines()[4], flush=True)
    text = report(args, env, peak, results)
    print(text, flush=True)
    (out_dir / "report.txt").write_text(text + "\n")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
