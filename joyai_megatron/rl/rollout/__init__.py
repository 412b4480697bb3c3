"""Rollout engines behind one interface (:class:`RolloutEngine`) and the weight sync they share."""

from __future__ import annotations

from typing import Any

import torch

from joyai_megatron.model.presets import ModelArch
from joyai_megatron.rl.rollout.base import RolloutEngine, Sample, SamplingParams

BACKENDS = ("local", "vllm", "sglang")


def build_engine(backend: str, arch: ModelArch, args: dict[str, Any], dtype: str) -> RolloutEngine:
    """The recipe's ``rl.rollout_backend`` with ``rl.rollout_args``; ``dtype`` as precision.dtype."""
    if backend == "local":
        from joyai_megatron.rl.rollout.local import LocalHFEngine

        unknown = sorted(set(args) - {"process", "threads"})
        if unknown:
            raise ValueError(
                f"rl.rollout_args {unknown} are not used by the local backend (process, threads)"
            )
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        if args.get("process"):
            from joyai_megatron.rl.rollout.process import ProcessHFEngine

            return ProcessHFEngine(arch, torch_dtype, threads=int(args.get("threads", 1)))
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        return LocalHFEngine(arch, torch_dtype, device)
    if backend in ("vllm", "sglang"):
        from joyai_megatron.rl.rollout.engines import SGLangEngine, VLLMEngine

        hf_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
        cls = VLLMEngine if backend == "vllm" else SGLangEngine
        return cls(arch, args, hf_dtype)
    raise ValueError(f"rl.rollout_backend must be one of {BACKENDS}, got {backend!r}")


__all__ = ["BACKENDS", "RolloutEngine", "Sample", "SamplingParams", "build_engine"]
