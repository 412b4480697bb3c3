"""Megatron-Core's MTP loss, normalised per micro-batch rather than per CP rank.

``multi_token_prediction.process_mtp_loss`` (Megatron-Core 0.19.2, l.757-880) rolls labels and loss
mask one token left inside each document (with CP, ``roll_tensor`` exchanges the chunk boundaries
between ranks, so the rolled mask is exactly this rank's share of the whole micro-batch's rolled
mask), then

* with ``calculate_per_token_loss`` back-propagates ``s * sum(mask' * loss) * a / b`` (l.866-871),
  ``s`` the MTP loss weight, ``a`` the count of the mask and ``b`` of the rolled mask ``mask'``, so
  that once ``finalize_model_grads`` divides by the main loss's token count the MTP loss is a mean
  over its own tokens; and
* logs ``sum(mask' * loss) / b`` per micro-batch, later averaged over the data-parallel x CP group
  (l.844-857).

Both ``a`` and ``b`` are counted on the rank.  Without CP a rank holds whole micro-batches and the
ratio is the micro-batch's; with CP each rank holds a share, and its own ``a_r / b_r`` differs from
the micro-batch's ``A / B`` (the rank holding a document's last chunk loses that token to the roll,
the others do not), and the logged value becomes a mean of per-rank means.  Measured on the tiny
model (CP=2 vs CP=1, same trained weights): MTP parameters' gradients 0.2-2% apart, logged MTP loss
1e-3 (causal rows) to 4e-2 (SFT conversations with masked prompts) apart; with this module, 5e-7.

:func:`process_mtp_loss_cp` calls the upstream function with the MTP loss weight of a private
config copy multiplied on rank ``r`` by ``(A / B) * (b_r / a_r)`` (``A``, ``B``: sums over the CP
group), which turns the gradient factor into the micro-batch's ``s * A / B``, as at CP=1, and then
replaces the logged per-micro-batch value by ``sum_r(sum(mask' * loss)) / B``.  One MTP layer only
(JoyAI's): every depth has its own ``b``, which one weight cannot fix for all, so more layers with
CP are refused.  At CP=1 the upstream function runs untouched.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.models.gpt import gpt_model
from megatron.core.transformer import multi_token_prediction as mtp

_UPSTREAM = mtp.process_mtp_loss


def process_mtp_loss_cp(**kwargs: Any) -> torch.Tensor:
    """Upstream ``process_mtp_loss`` (keyword arguments, as ``GPTModel._postprocess`` passes them),
    exact under context parallelism."""
    cp_group, loss_mask, config = kwargs.get("cp_group"), kwargs.get("loss_mask"), kwargs["config"]
    if cp_group is None or cp_group.size() == 1 or loss_mask is None or not config.calculate_per_token_loss:
        return _UPSTREAM(**kwargs)
    if config.mtp_num_layers != 1:
        raise NotImplementedError(
            f"MTP with {config.mtp_num_layers} layers under context parallelism: only one MTP layer "
            "is normalised exactly (compat/mtp.py)"
        )
    packed = kwargs.get("packed_seq_params")

    def roll(mask: torch.Tensor) -> torch.Tensor:
        return mtp.roll_tensor(mask, shifts=-1, dims=-1, cp_group=cp_group, packed_seq_params=packed)[0]

    # Without labels upstream derives them from input_ids and rolls the mask once more first.
    counted = loss_mask if kwargs.get("labels") is not None else roll(loss_mask)
    local = torch.stack([counted.sum(), roll(counted).sum()]).double()
    total = local.clone()
    dist.all_reduce(total, group=cp_group)
    (a, b), (big_a, big_b) = local.tolist(), total.tolist()
    config = copy.copy(config)
    if a > 0 and b > 0:
        config.mtp_loss_scaling_factor *= (big_a / big_b) * (b / a)

    tracker = mtp.MTPLossLoggingHelper.tracker
    logging = bool(kwargs.get("is_training"))  # upstream logs training forwards only
    before = tracker["loss_values"].clone() if logging and "loss_values" in tracker else None
    if before is not None:
        tracker["loss_values"].zero_()  # upstream adds this micro-batch's sum(mask' * loss) / b_r
    hidden_states = _UPSTREAM(**{**kwargs, "config": config})
    if logging and "loss_values" in tracker:
        values = tracker["loss_values"]
        rank_sum = values.double() * b  # this rank's sum(mask' * loss); 0 when b_r == 0
        dist.all_reduce(rank_sum, group=cp_group)
        values.copy_((rank_sum / max(big_b, 1.0)).to(values.dtype))
        if before is not None:
            values.add_(before)
    return hidden_states


def use_cp_exact_mtp_loss() -> bool:
    """Route ``GPTModel``'s MTP loss through :func:`process_mtp_loss_cp` (idempotent); the model's
    module looks the name up at call time."""
    if gpt_model.process_mtp_loss is process_mtp_loss_cp:
        return False
    gpt_model.process_mtp_loss = process_mtp_loss_cp
    return True
