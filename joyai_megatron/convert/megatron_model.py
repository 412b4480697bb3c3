"""Our Megatron model in one process (on the GPU when one is visible), loaded through Megatron's own loader.

Used by ``verify --logits`` and the conversion tests: the reference side of a logits comparison
must not share code with the converter, so weights come in through
``megatron.core.dist_checkpointing.load``, not through :mod:`joyai_megatron.convert.dist_ckpt`.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

from joyai_megatron.config.schema import ModelCfg, ParallelCfg, PrecisionCfg
from joyai_megatron.model.presets import ModelArch


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
):
    """Our GPTModel for ``arch`` (model-parallel state must already be initialised)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from joyai_megatron.model.build import build_joyai_model
    from joyai_megatron.model.config import build_transformer_config

    config = build_transformer_config(
        arch, ModelCfg(backend=backend, mtp_enabled=mtp), parallel or ParallelCfg(), PrecisionCfg(dtype=dtype)
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    model = build_joyai_model(
        config, arch, backend, pre_process=pre_process, post_process=post_process, pp_rank=pp_rank
    )
    if torch.cuda.is_available():
        # Megatron builds its linears on the GPU when one is visible, our norms on the host: one
        # device for all (hide the GPUs with CUDA_VISIBLE_DEVICES= to hold the model in host memory).
        model.cuda(torch.cuda.current_device())  # gpu-only
    return model


def load_megatron_checkpoint(model: torch.nn.Module, iteration_dir: str | os.PathLike) -> None:
    """Load ``model``'s shard of a ``torch_dist`` checkpoint with Megatron's loader (resharding)."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(Path(iteration_dir)))
    model.load_state_dict(state["model"], strict=True)


@torch.no_grad()
def megatron_logits(
    model: torch.nn.Module, input_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(main logits [b, s, V], MTP logits [b, s, V] or None) in eval mode, on ``input_ids``' device.

    Megatron computes the MTP block inside ``GPTModel.forward`` and keeps only its loss; a hook on
    ``model.mtp`` catches its hidden states, and the shared ``output_layer`` turns them into logits.
    MTP position i predicts token i+2; the last position sees a rolled-in pad and is meaningless.
    """
    model.eval()
    caught: list[torch.Tensor] = []
    handle = None
    if getattr(model, "mtp", None) is not None:
        handle = model.mtp.register_forward_hook(lambda _m, _i, out: caught.append(out))
    try:
        b, s = input_ids.shape
        device = next(model.parameters()).device  # the model may sit on a GPU, the ids on the host
        position_ids = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
        logits = model(input_ids.to(device), position_ids, None)
    finally:
        if handle is not None:
            handle.remove()
    mtp_logits = None
    if caught:
        depth = model.config.mtp_num_layers
        hidden = torch.chunk(caught[0], 1 + depth, dim=0)[1]  # [s, b, h]
        mtp_logits, _ = model.output_layer(hidden)
        mtp_logits = mtp_logits.transpose(0, 1).contiguous().to(input_ids.device)
    return logits.to(input_ids.device), mtp_logits


@torch.no_grad()
def megatron_greedy(model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation by full re-forwarding (no KV cache: correctness, not speed)."""
    ids = input_ids
    for _ in range(new_tokens):
        logits, _ = megatron_logits(model, ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, input_ids.shape[1] :]
