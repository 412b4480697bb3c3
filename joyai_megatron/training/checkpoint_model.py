"""A checkpoint on disk as a model on this one process: the one home of that rebuild.

Its saved recipe (:func:`load_checkpoint_recipe`), a one-rank world (:func:`init_single_process`),
our GPTModel built at TP=PP=EP=1 (:func:`build_megatron_model`; any training layout reshards on
load) and its weights alone, loaded by Megatron's own loader (``training.checkpoint.load_model_weights``).
:func:`rebuild_model` chains them; ``convert verify --logits``, ``quant.export``, ``sft_eval`` and
``eval`` all come through here.  Weights arrive through ``megatron.core.dist_checkpointing.load``,
never through :mod:`joyai_megatron.convert.dist_ckpt`, so the reference side of a conversion check
shares no code with the converter.  Reading a recipe imports no Megatron (conversion needs none).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from joyai_megatron.config.recipe import load_recipe
from joyai_megatron.config.schema import ModelCfg, ParallelCfg, PrecisionCfg, Recipe
from joyai_megatron.model.presets import ModelArch, recipe_arch
from joyai_megatron.training.checkpoint_scan import CheckpointError


def load_checkpoint_recipe(iteration_dir: Path) -> Recipe:
    """The resolved recipe saved in (or, for older checkpoints, beside) an ``iter_*`` directory."""
    for candidate in (iteration_dir / "recipe.yaml", iteration_dir.parent / "recipe.yaml"):
        if candidate.is_file():
            return load_recipe(candidate)
    raise CheckpointError(
        f"{iteration_dir}: no recipe.yaml beside the checkpoint; the architecture is unknown"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process() -> None:
    """A one-rank gloo world with Megatron's model-parallel state (TP=PP=EP=1)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from joyai_megatron import compat

    if not dist.is_initialized():
        # A private address: inherited MASTER_PORT (torchrun, Slurm, a parent test) may be taken.
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    compat.install()


def build_megatron_model(
    arch: ModelArch,
    *,
    backend: str = "local",
    dtype: str = "fp32",
    parallel: ParallelCfg | None = None,
    mtp: bool = True,
    pre_process: bool = True,
    post_process: bool = True,
    pp_rank: int | None = None,
    seed: int = 1234,
    model_cfg: ModelCfg | None = None,
    routing_replay: bool = False,
):
    """Our GPTModel for ``arch`` (model-parallel state must already be initialised).

    ``model_cfg``: a recipe's model section (recompute, grouped experts, dispatcher...) so a check
    builds what a shipped recipe trains, with ``backend`` and ``mtp`` from the arguments;
    ``routing_replay``: routers own a ``RouterReplay`` (a check feeds one model's expert choices
    to another)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from joyai_megatron.model.build import build_joyai_model
    from joyai_megatron.model.config import build_transformer_config

    model_cfg = replace(model_cfg or ModelCfg(), backend=backend, mtp_enabled=mtp)
    config = build_transformer_config(arch, model_cfg, parallel or ParallelCfg(), PrecisionCfg(dtype=dtype))
    config.moe_enable_routing_replay = routing_replay
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    model = build_joyai_model(
        config,
        arch,
        backend,
        pre_process=pre_process,
        post_process=post_process,
        pp_rank=pp_rank,
        grouped_gemm_impl=model_cfg.moe_grouped_gemm_impl,
    )
    if torch.cuda.is_available():
        # Megatron builds its linears on the GPU when one is visible, our norms on the host: one
        # device for all (hide the GPUs with CUDA_VISIBLE_DEVICES= to hold the model in host memory).
        model.cuda(torch.cuda.current_device())  # gpu-only
    return model


@dataclass
class CheckpointModel:
    """A checkpoint rebuilt on one process (in eval mode)."""

    model: torch.nn.Module
    recipe: Recipe
    arch: ModelArch
    iteration_dir: Path


def rebuild_model(
    iteration_dir: str | os.PathLike,
    *,
    as_trained: bool = False,
    before_load: Callable[[torch.nn.Module, Path], None] | None = None,
) -> CheckpointModel:
    """The model of one complete ``iter_*`` directory with its weights, on this process.

    ``as_trained``: the recipe's backend, dtype and seed (QAT export); otherwise fp32 on the
    ``local`` backend.  ``before_load(model, iteration_dir)`` runs between build and load (QAT:
    restore the ModelOpt quantizers whose amax the weights-only load then fills).
    """
    from joyai_megatron.training.checkpoint import load_model_weights  # Megatron: only when building

    iteration_dir = Path(iteration_dir)
    recipe = load_checkpoint_recipe(iteration_dir)
    arch = recipe_arch(recipe)
    init_single_process()
    mtp = arch.mtp_num_layers > 0
    if as_trained:
        model = build_megatron_model(
            arch, backend=recipe.model.backend, dtype=recipe.precision.dtype, mtp=mtp, seed=recipe.train.seed
        )
    else:
        model = build_megatron_model(arch, mtp=mtp)
    if before_load is not None:
        before_load(model, iteration_dir)
    load_model_weights(model, iteration_dir)
    return CheckpointModel(model.eval(), recipe, arch, iteration_dir)
