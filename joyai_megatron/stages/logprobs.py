"""Per-token log-probabilities from Megatron-Core's GPTModel, and running it without MTP.

Preference losses and generation need the main head only.  GPTModel runs its MTP block (and its
loss) whenever the model has one, so :func:`mtp_skipped` hides the block for one forward; the
weights stay in the model and in every checkpoint it writes, so conversion still exports them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from megatron.core import tensor_parallel

from joyai_megatron.training.checkpoint import unwrap


@contextmanager
def mtp_skipped(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` (any DDP/Float16Module wrapping) as if it had no MTP block.

    GPTModel reads two switches in its forward: ``mtp_process`` (run the block) and its own
    ``config.mtp_num_layers`` (split the MTP hidden states off and add their loss).  Both are
    turned off on the GPTModel object alone (a private copy of its config); its submodules keep the
    shared config, and everything is restored on exit.
    """
    gpt = unwrap(model)
    if not getattr(gpt, "mtp_process", False) and not gpt.config.mtp_num_layers:
        yield
        return
    saved_process, saved_config = gpt.mtp_process, gpt.config
    config = copy.copy(saved_config)
    config.mtp_num_layers = None
    gpt.mtp_process, gpt.config = False, config
    try:
        yield
    finally:
        gpt.mtp_process, gpt.config = saved_process, saved_config


def token_nll_processor(
    *,
    hidden_states: torch.Tensor,
    output_layer: Any,
    output_weight: torch.Tensor | None,
    labels: torch.Tensor,
    runtime_gather_output: bool | None,
    compute_language_model_loss: Any,
    scale_logits: Any,
    **_: Any,
) -> torch.Tensor:
    """GPTModel ``output_processor``: ``-log p(label)`` per token, ``[b, s]``.

    It goes through the model's own ``compute_language_model_loss`` (Megatron's
    ``vocab_parallel_cross_entropy``, or the fused kernel on GPU), which reduces over the
    vocabulary shards, so it is exact under tensor parallelism and never gathers full logits.
    """
    logits, _ = output_layer(hidden_states, weight=output_weight, runtime_gather_output=runtime_gather_output)
    return compute_language_model_loss(labels, scale_logits(logits))


def forward_token_nll(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    position_ids: torch.Tensor,
    labels: torch.Tensor,
    packed_seq_params: Any,
    padding_mask: torch.Tensor | None = None,
    cp_padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """Main-head ``-log p`` per token on the last pipeline stage (hidden states elsewhere).

    ``padding_mask`` (True on filler tokens, shaped like ``tokens``) keeps padding out of the MoE
    routers' load counts, which drive the aux-loss-free expert bias.  ``cp_padding`` (True on the
    padding the context-parallel split added, ``PackedBatch.padding_mask``) is always kept out, so
    the loads are those of one process (``compat/router.py`` makes that work with the expert bias).
    """
    if _expert_bias(model):
        padding_mask = None
    if cp_padding is not None:
        padding_mask = cp_padding if padding_mask is None else padding_mask | cp_padding
    with mtp_skipped(model):
        return model(
            tokens,
            position_ids,
            None,
            labels=labels,
            packed_seq_params=packed_seq_params,
            # Megatron-Core 0.19.2's router._apply_expert_bias does `routing_map & ~padding_mask`
            # with shapes [tokens, experts] and [tokens], which cannot broadcast: with the
            # aux-loss-free expert bias a padding mask crashes the forward.  Until that is fixed
            # upstream, padding tokens count in the routers' load statistics (~1% of tokens), as
            # they do at CP=1 (``cp_padding`` above keeps CP runs equal to that).
            padding_mask=stage_padding_mask(model, padding_mask),
            output_processor=token_nll_processor,
        )


def _expert_bias(model: torch.nn.Module) -> bool:
    return bool(getattr(unwrap(model).config, "moe_router_enable_expert_bias", False))


def stage_padding_mask(model: torch.nn.Module, padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The padding mask as this pipeline stage's MoE layers see it.

    GPTModel splits the mask over sequence-parallel ranks together with the embeddings, which only
    the first pipeline stage computes; later stages receive hidden states already split, so the
    mask is split here the same way.
    """
    gpt = unwrap(model)
    if padding_mask is None or gpt.pre_process or not gpt.config.sequence_parallel:
        return padding_mask
    split = tensor_parallel.scatter_to_sequence_parallel_region(padding_mask.transpose(0, 1).contiguous())
    return split.transpose(0, 1).contiguous()


def segment_logps(
    token_nll: torch.Tensor, loss_mask: torch.Tensor, segment: torch.Tensor, num_segments: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of masked ``log p`` and masked token count per segment id of each row.

    ``token_nll``, ``loss_mask`` and ``segment`` are ``[rows, length]`` (or flattenable to it);
    segment ids ``>= num_segments`` (padding) are ignored.  Returns ``[rows, num_segments]`` twice.
    """
    rows = segment.shape[0]
    mask = loss_mask.reshape(rows, -1).float().to(token_nll.device)
    logp = torch.where(mask > 0, -token_nll.reshape(rows, -1).float(), 0.0)
    ids = segment.reshape(rows, -1).long().to(logp.device)
    onehot = torch.stack([(ids == k) for k in range(num_segments)], dim=-1).to(logp.dtype)  # [r, l, k]
    return torch.einsum("rl,rlk->rk", logp, onehot), torch.einsum("rl,rlk->rk", mask, onehot)
