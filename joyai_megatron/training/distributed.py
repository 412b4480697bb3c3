"""Process-group setup from torchrun or Slurm environment variables (NCCL on GPU, gloo on CPU)."""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from joyai_megatron import compat
from joyai_megatron.training.layout import Layout


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_dist_env() -> DistEnv:
    """torchrun's RANK/WORLD_SIZE/LOCAL_RANK, else Slurm's SLURM_PROCID/NTASKS/LOCALID, else 1 process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env:
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistEnv(0, 1, 0)


def init_distributed(timeout_minutes: int = 30) -> DistEnv:
    """Initialise torch.distributed (idempotent): NCCL when CUDA is present, gloo otherwise.

    The rendezvous address comes from MASTER_ADDR/MASTER_PORT (torchrun, the Slurm launcher) or, for
    one process, a free local port; the environment is left untouched so that processes started
    later (tests, tools) do not inherit a stale port or rank.
    """
    info = read_dist_env()
    compat.install()
    if dist.is_initialized():
        return info
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = os.environ.get("MASTER_PORT")
    if port is None:
        if info.world_size > 1:
            raise RuntimeError(
                "MASTER_PORT must be set for multi-process runs (torchrun or the Slurm launcher sets it)"
            )
        port = str(_free_port())
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())  # gpu-only
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{addr}:{port}",
        rank=info.rank,
        world_size=info.world_size,
        timeout=timedelta(minutes=timeout_minutes),
    )
    return info


def init_model_parallel(layout: Layout) -> None:
    """Create Megatron-Core's TP/PP/CP/EP/DP groups for a validated layout."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )


def set_seed(seed: int) -> None:
    """Seed every RNG; Megatron's tracker gives each TP/EP rank its own stream for init and dropout."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def current_device() -> torch.device:
    """Where batches go: this rank's GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())  # gpu-only
    return torch.device("cpu")


def shutdown() -> None:
    """Tear down the process groups and the process-global loss trackers Megatron-Core keeps, so a
    later run in the same process (the demo's stages, tests) starts from nothing: a forward left in
    the MTP tracker would otherwise be added to that run's first logged MTP loss."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    MTPLossLoggingHelper.tracker.clear()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
