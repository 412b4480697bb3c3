"""The frozen reference policy for the KL term: the starting checkpoint's weights, kept on the host.

Instead of a second model (twice the GPU memory), the reference weights are swapped into the live
model for the reference log-prob pass and swapped back afterwards (NeMo-RL does the same with a
state dict). On resume the live model holds the RL checkpoint, so the reference is re-read from
``checkpoint.load`` rather than snapshotted.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from joyai_megatron.training.checkpoint import unwrap


def policy_tensors(chunks: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every parameter and router expert bias of the model chunks, keyed ``chunk.name``."""
    out = {}
    for i, chunk in enumerate(chunks):
        model = unwrap(chunk)
        for name, p in model.named_parameters():
            out[f"{i}.{name}"] = p
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                out[f"{i}.{name}"] = b
    return out


def snapshot(chunks: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {n: t.detach().to("cpu", copy=True) for n, t in policy_tensors(chunks).items()}


@torch.no_grad()
def load_into(chunks: list[torch.nn.Module], state: dict[str, torch.Tensor]) -> None:
    live = policy_tensors(chunks)
    if live.keys() != state.keys():
        raise ValueError("reference weights do not match the model's tensors")
    for name, tensor in live.items():
        tensor.copy_(state[name])


@contextmanager
def swapped_weights(chunks: list[torch.nn.Module], state: dict[str, torch.Tensor]) -> Iterator[None]:
    """Run the body with ``state`` in the model, then put the live weights back bit for bit."""
    backup = snapshot(chunks)
    load_into(chunks, state)
    try:
        yield
    finally:
        load_into(chunks, backup)


def reference_from_checkpoint(trainer, path: str) -> dict[str, torch.Tensor]:
    """Weights of checkpoint ``path`` read through the trainer's loader, leaving the live model and
    every RNG as they were."""
    from joyai_megatron.training import checkpoint as ckpt

    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    backup = snapshot(trainer.model)
    ckpt.load_checkpoint(
        ckpt.resolve_checkpoint(path),
        trainer.model,
        trainer.optimizer,
        trainer.scheduler,
        load_optimizer=False,
        load_counters=False,
        allow_missing=list(trainer.recipe.checkpoint.allow_missing),
    )
    reference = snapshot(trainer.model)
    load_into(trainer.model, backup)
    random.setstate(rng[0])
    np.random.set_state(rng[1])
    torch.set_rng_state(rng[2])
    return reference
