"""Logits and greedy continuations of our Megatron model on one process (MTP head included).

Used by ``verify --logits``, ``quant.export --verify-logits``, ``eval`` and the conversion tests on
a model that :mod:`joyai_megatron.training.checkpoint_model` rebuilt from a checkpoint.
"""

from __future__ import annotations

import torch


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
