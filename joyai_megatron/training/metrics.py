"""The training log line, TensorBoard and wandb (offline unless ``WANDB_API_KEY`` is set)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from joyai_megatron.config.schema import Recipe

# Dense bf16 tensor-core peaks (TFLOP/s) for MFU; override with JOYAI_PEAK_TFLOPS.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0}


def device_peak_tflops() -> float | None:
    override = os.environ.get("JOYAI_PEAK_TFLOPS")
    if override:
        return float(override)
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


# Averaged over the steps since the previous log line (as Megatron logs them): one step's loss is
# one global batch's, which at small batches swings by more than a whole interval's progress.
AVERAGED_KEYS = ("loss", "lm_loss", "mtp_loss")


def interval_means(window: list[dict[str, float]]) -> dict[str, float]:
    """The last step's values, with each of ``AVERAGED_KEYS`` replaced by its mean over ``window``
    (the steps since the previous line) and ``interval_steps`` saying how many steps that was."""
    values = dict(window[-1])
    for key in AVERAGED_KEYS:
        seen = [w[key] for w in window if key in w]
        if seen:
            values[key] = sum(seen) / len(seen)
    values["interval_steps"] = float(len(window))
    return values


class MetricsLogger:
    """Rank-0 logger: one line per ``logging.interval`` steps plus TensorBoard/wandb scalars."""

    def __init__(self, recipe: Recipe, is_writer: bool, flops_per_token: float, world_size: int) -> None:
        self.recipe = recipe
        self.is_writer = is_writer
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak = device_peak_tflops()
        self.tb = None
        self.wandb = None
        self.jsonl = None
        self._window_start = time.time()
        self._window_tokens = 0
        if not is_writer:
            return
        log_dir = Path(recipe.logging.dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = (log_dir / "metrics.jsonl").open("a")
        if recipe.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(log_dir / "tensorboard"))
        if recipe.logging.wandb_project:
            import wandb

            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            self.wandb = wandb.init(
                project=recipe.logging.wandb_project,
                name=recipe.logging.wandb_name or recipe.name,
                dir=str(log_dir),
                mode=mode,
                config={"recipe": recipe.name},
            )

    def count_tokens(self, tokens: int) -> None:
        self._window_tokens += tokens

    def log(self, step: int, total_steps: int, values: dict[str, float]) -> str | None:
        """Emit the line for ``step``; returns it (rank 0) for tests and callers."""
        now = time.time()
        elapsed = max(now - self._window_start, 1e-9)
        tokens_per_s = self._window_tokens / elapsed
        self._window_start, self._window_tokens = now, 0
        tflops_per_gpu = tokens_per_s * self.flops_per_token / 1e12 / max(self.world_size, 1)
        values = dict(values)
        values["tokens_per_s"] = tokens_per_s
        values["tflops_per_gpu"] = tflops_per_gpu
        if self.peak:
            values["mfu"] = tflops_per_gpu / self.peak
        steps_left = max(total_steps - step, 0)
        steps = values.get("interval_steps") or max(self.recipe.logging.interval, 1)
        eta = format_eta(steps_left * elapsed / steps)
        if not self.is_writer:
            return None
        parts = [f"step {step}/{total_steps}"]
        for key in ("consumed_tokens", "loss", "lm_loss", "mtp_loss", "lr", "grad_norm"):
            if key in values:
                parts.append(_fmt(key, values[key]))
        parts.append(f"tokens/s {tokens_per_s:,.0f}")
        parts.append(f"TFLOP/s/gpu {tflops_per_gpu:.2f}")
        parts.append(f"mfu {values['mfu'] * 100:.1f}%" if "mfu" in values else "mfu n/a")
        for key in sorted(values):
            if key.startswith(("moe/", "stage/")):
                parts.append(_fmt(key, values[key]))
        parts.append(f"eta {eta}")
        line = " | ".join(parts)
        print(line, flush=True)
        self.scalars(step, values)
        return line

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        if not self.is_writer:
            return
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
            self.jsonl.flush()
        for key, value in values.items():
            if self.tb is not None and isinstance(value, int | float) and math.isfinite(float(value)):
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in values.items() if isinstance(v, int | float)}, step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _fmt(key: str, value: float) -> str:
    if key == "consumed_tokens":
        return f"tokens {int(value):,}"
    if key == "lr":
        return f"lr {value:.3e}"
    if isinstance(value, float):
        return f"{key.replace('_', ' ')} {value:.4f}"
    return f"{key} {value}"
