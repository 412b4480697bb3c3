"""Helpers every test folder shares: the repository root, the tiny recipes, the environment a child
process must not inherit, and the real entry points run as users run them (python -m / torchrun).

Tests import them as ``tests.joyai_helpers`` (``tests/`` and its folders are packages; pytest puts
the repository root on ``sys.path``)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_BASE = REPO / "recipes" / "pretrain" / "tiny_cpu" / "base.yaml"
SFT_RECIPE = REPO / "recipes" / "sft" / "tiny_cpu.yaml"
DPO_RECIPE = REPO / "recipes" / "dpo" / "tiny_cpu.yaml"
QAT_TINY = REPO / "recipes" / "qat" / "tiny_cpu.yaml"
RL_TINY = REPO / "recipes" / "rl" / "tiny_cpu.yaml"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (``benchmarks/`` is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_mock_recipe(directory: Path, name: str = "recipe.yaml", **sections: dict) -> Path:
    """A tiny pretraining recipe on Megatron's mock dataset, writing only under ``directory``."""
    recipe = {
        "base": str(TINY_BASE),
        "model": {"mtp_enabled": True},
        "data": {"mock": True, "tokenizer": "", "blend": None, "cache_dir": str(directory / "cache")},
        "train": {"train_iters": 2, "eval_interval": 0, "global_batch_size": 8, "micro_batch_size": 2},
        "checkpoint": {"dir": str(directory / "ckpt"), "save_interval": 0},
        "logging": {"dir": str(directory / "logs"), "interval": 1, "tensorboard": False},
        "scheduler": {"warmup_tokens": 0, "decay_style": "constant"},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path = directory / name
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


def joyai_command(stage: str, recipe: Path, overrides: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "joyai_megatron", stage, str(recipe), *overrides]
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-port", str(free_port()), "-m", "joyai_megatron", stage, str(recipe), *overrides,
    ]  # fmt: skip


# A launcher's (torchrun, Slurm) or an in-process test's rank variables: a test that starts its own
# world, or a child process, must not see them (plus every TORCHELASTIC_* variable).
DIST_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
    "SLURM_PROCID", "SLURM_NTASKS",
)  # fmt: skip


def scrubbed_env(**extra: str) -> dict[str, str]:
    """This environment without :data:`DIST_VARS`, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith("TORCHELASTIC")}
    return {**env, **extra}


def leave_launcher_world() -> None:
    """Drop :data:`DIST_VARS` from this process's environment: an in-process run is one rank."""
    for key in [k for k in os.environ if k in DIST_VARS or k.startswith("TORCHELASTIC")]:
        del os.environ[key]


def clean_env() -> dict[str, str]:
    return scrubbed_env(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m joyai_megatron ARGS`` in a fresh interpreter, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "joyai_megatron", *args],
        cwd=REPO,
        env=scrubbed_env(PYTHONWARNINGS="ignore"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_joyai(
    stage: str, recipe: Path, overrides: list[str] | None = None, nproc: int = 1, timeout: int = 600
) -> subprocess.CompletedProcess:
    env = clean_env()
    result = subprocess.run(
        joyai_command(stage, recipe, overrides or [], nproc),
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-6000:] + result.stderr[-6000:])
    return result


def start_joyai(stage: str, recipe: Path, overrides: list[str], **popen: object) -> subprocess.Popen:
    """A run in its own process group, so :func:`kill_run` takes its async checkpoint writers with
    it, as Slurm or torchrun ending a job does (a writer left behind blocks forever, ~750 MB each)."""
    return subprocess.Popen(
        joyai_command(stage, recipe, overrides), cwd=REPO, env=clean_env(), start_new_session=True, **popen
    )


def kill_run(proc: subprocess.Popen) -> int:
    """SIGKILL the run and every process it started; returns its exit status."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def read_metrics(log_dir: Path) -> list[dict]:
    path = log_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def relative_error(a, b) -> float:
    """||a - b|| / ||b|| in fp32 (``a`` reshaped to ``b``'s shape)."""
    b = b.float()
    return float((a.float().reshape(b.shape) - b).norm() / b.norm().clamp_min(1e-30))


@contextlib.contextmanager
def saved_activation_bytes(model: Any) -> Iterator[list[int]]:
    """Measure what autograd keeps for backward inside the block: yields a list whose one element,
    after the block, is the bytes of the distinct storages saved, the model's weights left out."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    result = [0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result[0] = sum(kept.values())
