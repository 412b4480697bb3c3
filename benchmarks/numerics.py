"""CPU vs GPU numerics: the tiny model, the same weights and batches, fp32, a few training steps.

Each device builds the model through the trainer core, then every parameter is overwritten from a
CPU generator seeded by the parameter's name, so both start from bit-identical weights whatever
their device's RNG does; the batches come from Megatron's seeded mock dataset. The per-step losses
(main and MTP) must agree within ``--tol``.

    python benchmarks/numerics.py --device cpu                 # prints the per-step losses (JSON)
    python benchmarks/numerics.py --compare                    # runs cpu and cuda, diffs them
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Run as a script, sys.path[0] is benchmarks/, whose data_prep.py would shadow the package.
sys.path[0] = str(REPO)

import torch  # noqa: E402

RESULT = "RESULT "
INIT_STD = 0.02


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--optimizer", choices=("muon", "adam"), default="muon")
    p.add_argument("--experts", choices=("sequential", "grouped"), default="sequential")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--compare", action="store_true", help="run on cpu and cuda and compare")
    p.add_argument("--tol", type=float, default=1e-4)
    return p.parse_args(argv)


def reinit_parameters(model: torch.nn.Module, seed: int) -> int:
    """Overwrite every parameter from a CPU generator keyed by its name: matrices ~ N(0, 0.02),
    vectors (the RMSNorm weights) = 1. Returns how many parameters were set."""
    count = 0
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            gen = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
            if param.ndim >= 2:
                value = torch.randn(param.shape, generator=gen, dtype=torch.float32) * INIT_STD
            else:
                value = torch.ones(param.shape, dtype=torch.float32)
            param.copy_(value.to(param.device, param.dtype))
            count += 1
    return count


def full_precision_muon(optimizer: Any) -> None:
    """Newton-Schulz in fp32: training runs it in bf16 ("medium"), whose rounding differs between
    CPU and GPU kernels and would be compared here instead of the model's arithmetic."""
    from joyai_megatron.optim.builder import _leaf_optimizers

    for leaf in _leaf_optimizers(optimizer):
        inner = getattr(leaf, "optimizer", leaf)
        if hasattr(inner, "fp32_matmul_prec"):
            inner.fp32_matmul_prec = "highest"


def write_recipe(args: argparse.Namespace, directory: Path) -> Path:
    import yaml

    recipe = {
        "base": str(REPO / "recipes" / "pretrain" / "tiny_cpu" / "base.yaml"),
        "name": "numerics_tiny_fp32",
        "model": {"mtp_enabled": True, "moe_grouped_gemm": args.experts == "grouped"},
        "precision": {"dtype": "fp32"},
        "train": {
            "seq_length": 128,
            "micro_batch_size": 2,
            "global_batch_size": 4,
            "train_iters": args.steps,
            "eval_interval": 0,
            "rampup_batch_size": None,
            "seed": args.seed,
        },
        "optim": {"optimizer": args.optimizer},
        "scheduler": {"warmup_tokens": 0, "decay_style": "constant"},
        "data": {"mock": True, "tokenizer": "", "blend": None, "cache_dir": None},
        "checkpoint": {"dir": str(directory / "ckpt"), "save_interval": 0},
        "logging": {"dir": str(directory / "logs"), "tensorboard": False},
    }
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run(args: argparse.Namespace) -> dict[str, Any]:
    from joyai_megatron.config.recipe import load_recipe
    from joyai_megatron.stages.pretrain import PretrainStage
    from joyai_megatron.training.distributed import shutdown
    from joyai_megatron.training.trainer import Trainer

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if args.device == "cuda":
        # Plain fp32 matmuls: TF32 would be a different (less precise) computation.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(load_recipe(write_recipe(args, Path(tmp))), PretrainStage)
        try:
            model = trainer.model[0].module
            n = reinit_parameters(model, args.seed)
            full_precision_muon(trainer.optimizer)
            steps = [trainer.train_step() for _ in range(args.steps)]
        finally:
            shutdown()
    where = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    return {
        "device": where,
        "parameters_set": n,
        "lm_loss": [s["lm_loss"] for s in steps],
        "mtp_loss": [s.get("mtp_loss", 0.0) for s in steps],
        "grad_norm": [s["grad_norm"] for s in steps],
    }


def run_in_child(argv: list[str], device: str, timeout: float = 600) -> dict[str, Any]:
    """This script on one device in a fresh process (the CPU run sees no GPU at all)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--device", device]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"")[-3000:] if isinstance(err.stdout, bytes) else (err.stdout or "")[-3000:]
        raise RuntimeError(f"{device} run still going after {timeout} s; its output so far:\n{out}") from err
    print(f"{device} run: exit {proc.returncode} after {time.perf_counter() - start:.0f} s", flush=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])
    raise RuntimeError(
        f"{device} run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    )


def compare(argv: list[str], tol: float) -> dict[str, Any]:
    cpu, gpu = run_in_child(argv, "cpu"), run_in_child(argv, "cuda")
    diffs = {
        key: [abs(a - b) for a, b in zip(cpu[key], gpu[key], strict=True)] for key in ("lm_loss", "mtp_loss")
    }
    worst = max(max(d) for d in diffs.values())
    return {"cpu": cpu, "gpu": gpu, "abs_diff": diffs, "max_abs_diff": worst, "tol": tol, "ok": worst <= tol}


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    if not args.compare:
        print(RESULT + json.dumps(run(args)), flush=True)
        return 0
    child_argv = [a for a in raw if a != "--compare"]
    result = compare(child_argv, args.tol)
    for step, (a, b) in enumerate(zip(result["cpu"]["lm_loss"], result["gpu"]["lm_loss"], strict=True), 1):
        print(f"step {step}: lm loss cpu {a:.7f}  gpu {b:.7f}  |diff| {abs(a - b):.2e}")
    print(
        f"{result['gpu']['device']} vs cpu: max |loss diff| {result['max_abs_diff']:.2e} (tol {args.tol:g})"
    )
    print(RESULT + json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
