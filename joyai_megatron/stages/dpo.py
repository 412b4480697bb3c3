"""Direct preference optimisation on the shared trainer: sigmoid (cDPO) or IPO, optional SFT term.

A micro-batch row packs one pair: chosen, then rejected, then padding, as three THD segments, so
both answers of a pair are always in the same micro-batch and attend only to themselves.  Sequence
log-probs are sums over response tokens of the main head's ``log p`` (``logprobs.py``; the MTP
block is skipped and frozen, its weights pass through to the output checkpoint unchanged).

The reference is the starting checkpoint: kept live as a frozen second copy (``dpo.reference:
live``) or used once to precompute every pair's log-probs into ``dpo.reference_logps`` (default
``<checkpoint.dir>/reference_logps.pt``) before the first step (``precomputed``).  Loss and
metrics follow TRL's ``DPOTrainer`` (names included: ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

from joyai_megatron.stages.logprobs import forward_token_nll, segment_logps
from joyai_megatron.stages.reference import (
    build_frozen_copy,
    forward_only,
    load_reference_logps,
    precompute,
    save_reference_logps,
)
from joyai_megatron.stages.sampling import ShuffledBlend
from joyai_megatron.training import checkpoint as ckpt
from joyai_megatron.training.distributed import current_device
from joyai_megatron.training.packing import PackedBatch, pack_batch, split_for_context_parallel
from joyai_megatron.training.stage import Stage

LOSS_TYPES = ("sigmoid", "ipo")
REFERENCE_MODES = ("live", "precomputed")
CHOSEN, REJECTED, PADDING = 0, 1, 2


class PairRows:
    """Preference pairs as packed rows of ``seq_length`` tokens: [chosen | rejected | padding].

    Items: ``tokens``, ``labels``, ``loss_mask`` (1 on response-token labels), ``position_ids``
    (restarting per segment), ``segment`` (0 chosen, 1 rejected, 2 padding), ``cu_seqlens``
    (``[0, Lc, Lc+Lr, seq_length]``) and, once attached, ``ref_logps`` ``[chosen, rejected]``.
    """

    def __init__(self, path: str, key: str, seq_length: int) -> None:
        from data_prep.dpo import PreferenceDataset

        self.path, self.key, self.seq_length = path, key, seq_length
        self.pairs = PreferenceDataset(path)
        self.metadata = self.pairs.metadata
        self.ref_logps: torch.Tensor | None = None
        if len(self.pairs) == 0:
            raise ValueError(f"{key}: {path} has no preference pairs")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.pairs[index]
        lc, lr = pair["chosen_length"], pair["rejected_length"]
        n = self.seq_length
        if lc + lr > n:
            raise ValueError(
                f"{self.key}: {self.path} pair {index} has {lc} + {lr} tokens, more than train.seq_length "
                f"{n}: a row holds both answers, so raise train.seq_length (or re-run data_prep dpo shorter)"
            )
        pad = n - lc - lr
        item = {
            "tokens": np.concatenate(
                [pair["chosen_tokens"][:lc], pair["rejected_tokens"][:lr], np.full(pad, self.pairs.pad_id)]
            ),
            "labels": np.concatenate(
                [pair["chosen_labels"][:lc], pair["rejected_labels"][:lr], np.full(pad, self.pairs.pad_id)]
            ),
            "loss_mask": np.concatenate(
                [pair["chosen_loss_mask"][:lc], pair["rejected_loss_mask"][:lr], np.zeros(pad, np.float32)]
            ),
            "position_ids": np.concatenate([np.arange(lc), np.arange(lr), np.arange(pad)]),
            "segment": np.repeat(np.array([CHOSEN, REJECTED, PADDING]), [lc, lr, pad]),
            "cu_seqlens": np.array([0, lc, lc + lr, n], dtype=np.int32),
        }
        if self.ref_logps is not None:
            item["ref_logps"] = self.ref_logps[index]
        return item


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss and the implicit rewards ``beta * (logp - ref_logp)`` (detached).

    ``sigmoid``: ``-(1-ls) log sigma(beta d) - ls log sigma(-beta d)`` with ``d`` the difference of
    the chosen and rejected log-ratios (DPO; conservative DPO when ``ls > 0``).  ``ipo``: TRL's
    length-normalised IPO, ``(d' - 1/(2 beta))^2`` with each log-ratio divided by its response's
    token count.
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        delta = beta * (chosen_ratio - rejected_ratio)
        losses = -(1.0 - label_smoothing) * F.logsigmoid(delta) - label_smoothing * F.logsigmoid(-delta)
    elif loss_type == "ipo":
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (delta - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"dpo.loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def _mean_entry(values: torch.Tensor) -> torch.Tensor:
    """``[sum, count]``: the trainer averages these over micro-batches and data-parallel ranks."""
    return torch.stack(
        [values.detach().float().sum(), torch.tensor(float(values.numel()), device=values.device)]
    )


class DPOStage(Stage):
    name = "dpo"
    supports_context_parallel = True
    uses_mtp_loss = False
    frozen_parameters = ("mtp.",)

    def __init__(self, recipe: Any) -> None:
        super().__init__(recipe)
        self.pairs: dict[str, PairRows] = {}
        self.reference: list[torch.nn.Module] | None = None

    @staticmethod
    def reference_checkpoint(recipe: Any) -> str:
        path = recipe.dpo.reference_checkpoint or recipe.checkpoint.load
        if not path:
            raise ValueError(
                "DPO needs a reference: set checkpoint.load (the SFT checkpoint) or dpo.reference_checkpoint"
            )
        return str(ckpt.resolve_checkpoint(path))

    @staticmethod
    def reference_logps_path(recipe: Any) -> Path:
        return Path(recipe.dpo.reference_logps or Path(recipe.checkpoint.dir) / "reference_logps.pt")

    @classmethod
    def check_recipe(cls, recipe: Any) -> None:
        p, t = recipe.dpo, recipe.train
        if p.loss_type not in LOSS_TYPES:
            raise ValueError(f"dpo.loss_type must be one of {LOSS_TYPES}, got {p.loss_type!r}")
        if p.reference not in REFERENCE_MODES:
            raise ValueError(f"dpo.reference must be one of {REFERENCE_MODES}, got {p.reference!r}")
        if p.beta <= 0:
            raise ValueError(f"dpo.beta must be positive, got {p.beta}")
        if not 0.0 <= p.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {p.label_smoothing}")
        if p.sft_loss_weight < 0:
            raise ValueError(f"dpo.sft_loss_weight must be >= 0, got {p.sft_loss_weight}")
        if not recipe.data.dpo_path:
            raise ValueError("data.dpo_path must name a preference file (python -m data_prep dpo)")
        if t.eval_interval and not p.valid_path:
            raise ValueError("train.eval_interval > 0 needs dpo.valid_path (a preference file)")
        for key, path in (("data.dpo_path", recipe.data.dpo_path), ("dpo.valid_path", p.valid_path)):
            if path and not Path(path).is_file():
                raise FileNotFoundError(
                    f"{key}: {path} does not exist (build it with `python -m data_prep dpo`)"
                )
        cls.reference_checkpoint(recipe)
        if recipe.checkpoint.load and ckpt.latest_iteration(recipe.checkpoint.dir) is None:
            ckpt.resolve_checkpoint(recipe.checkpoint.load)

    def build_datasets(self, train_samples: int, valid_samples: int) -> dict[str, Any]:
        t = self.recipe.train
        self.pairs = {"train": PairRows(self.recipe.data.dpo_path, "data.dpo_path", t.seq_length)}
        if t.eval_interval:
            self.pairs["valid"] = PairRows(self.recipe.dpo.valid_path, "dpo.valid_path", t.seq_length)
        self.datasets = {"train": ShuffledBlend([self.pairs["train"]], [1.0], train_samples, seed=t.seed)}
        if "valid" in self.pairs:
            self.datasets["valid"] = self.pairs["valid"]
        return self.datasets

    # --- reference ----------------------------------------------------------------------------------
    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        reference = self.reference_checkpoint(self.recipe)
        if self.recipe.dpo.reference == "live":
            self.reference = build_frozen_copy(trainer, reference)
            return
        path = self.reference_logps_path(self.recipe)
        meta = {
            "reference": reference,
            **{f"{s}_path": str(Path(rows.path).resolve()) for s, rows in self.pairs.items()},
            **{f"{s}_pairs": len(rows) for s, rows in self.pairs.items()},
        }
        if path.is_file():
            values = load_reference_logps(path, meta)
        elif trainer.state.iteration > 0:
            raise FileNotFoundError(
                f"dpo.reference_logps: {path} is missing but the run is at step {trainer.state.iteration}: "
                "the policy no longer equals the reference, so it cannot be recomputed here"
            )
        else:
            chunks = build_frozen_copy(trainer, reference)
            values = {
                split: precompute(
                    chunks, self._reference_step, rows, self.collate, self.recipe, get_num_microbatches()
                )
                for split, rows in self.pairs.items()
            }
            del chunks
            save_reference_logps(path, values, meta)
        for split, rows in self.pairs.items():
            rows.ref_logps = values[split].float()

    def microbatches(self, split: str, start: int, num_microbatches: int) -> list[dict[str, torch.Tensor]]:
        batches = super().microbatches(split, start, num_microbatches)
        if self.reference is not None:
            outputs = forward_only(self.reference, self._reference_step, batches, self.recipe)
            for batch, out in zip(batches, outputs, strict=False):  # outputs exist on the last stage only
                batch["ref_logps"] = out["ref_logps"]
        return batches

    # --- forward --------------------------------------------------------------------------------------
    def _forward(self, batch: dict[str, torch.Tensor], model: torch.nn.Module) -> tuple[torch.Tensor, PackedBatch]:
        """Main-head ``-log p`` of this rank's tokens, and the packed batch they belong to."""
        rows, length = batch["tokens"].shape
        offsets = (torch.arange(rows, dtype=torch.int32) * length)[:, None]
        cu = torch.unique_consecutive(
            torch.cat(
                [
                    (batch["cu_seqlens"][:, :-1] + offsets).reshape(-1),
                    torch.tensor([rows * length], dtype=torch.int32),
                ]
            )
        )
        packed = pack_batch(
            batch["tokens"], batch["labels"], batch["loss_mask"], batch["position_ids"], cu_seqlens=cu
        )
        packed = split_for_context_parallel(packed, sequence_parallel=self.recipe.parallel.sequence_parallel)
        padding = packed.local(batch["segment"] == PADDING, True)  # CP's own padding is padding too
        device = packed.to(current_device())
        token_nll = forward_token_nll(
            model,
            device.tokens,
            device.position_ids,
            device.labels,
            device.packed_seq_params,
            padding.to(device.tokens.device),
            cp_padding=packed.padding_mask(device.tokens.device),
        )
        return token_nll, packed

    def _pair_logps(
        self, token_nll: torch.Tensor, batch: dict[str, torch.Tensor], packed: PackedBatch | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[rows, 2]`` summed ``log p`` of each pair's chosen and rejected response tokens, and
        their token counts.  Under context parallelism each rank sums its own tokens and the sums
        are all-reduced over the CP group with an identity backward: every rank then computes the
        same pair losses and differentiates them through its own tokens only, so the gradients the
        DDP reduction adds up over CP ranks are those of one process."""
        if packed is None or packed.source is None:
            return segment_logps(token_nll, batch["loss_mask"], batch["segment"], 2)
        rows = batch["segment"].shape[0]
        pair = torch.arange(rows)[:, None] * 2 + batch["segment"]
        ids = torch.where(batch["segment"] < PADDING, pair, rows * 2)  # rows * 2: ignored
        logps, tokens = segment_logps(
            token_nll.reshape(1, -1), packed.local(batch["loss_mask"]), packed.local(ids, rows * 2), rows * 2
        )
        group = parallel_state.get_context_parallel_group()
        logps = reduce_from_tensor_model_parallel_region(logps.reshape(rows, 2), group=group)
        tokens = reduce_from_tensor_model_parallel_region(tokens.reshape(rows, 2), group=group)
        return logps, tokens

    def _reference_step(self, data_iterator: Iterator, model: torch.nn.Module):
        batch = next(data_iterator)
        token_nll, packed = self._forward(batch, model)

        def loss(token_nll: torch.Tensor):
            logps, _ = self._pair_logps(token_nll, batch, packed)
            zero = torch.zeros((), device=logps.device)
            count = torch.tensor(logps.shape[0], dtype=torch.int, device=logps.device)
            return zero, count, {"ref_logps": logps.detach()}

        return token_nll, loss

    def forward_step(self, data_iterator: Iterator, model: torch.nn.Module):
        batch = next(data_iterator)
        token_nll, packed = self._forward(batch, model)
        return token_nll, partial(self._loss, batch, packed=packed)

    def _loss(self, batch: dict[str, torch.Tensor], token_nll: torch.Tensor, packed: PackedBatch | None = None):
        if "ref_logps" not in batch:
            raise RuntimeError("DPO batch has no reference log-probs (dpo.reference setup did not run)")
        p = self.recipe.dpo
        logps, tokens = self._pair_logps(token_nll, batch, packed)
        ref = batch["ref_logps"].to(logps)
        losses, chosen_rewards, rejected_rewards = preference_loss(
            logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], tokens[:, 0], tokens[:, 1],
            beta=p.beta, loss_type=p.loss_type, label_smoothing=p.label_smoothing,
        )  # fmt: skip
        metrics = {}
        if p.sft_loss_weight > 0:
            # Mean negative log-likelihood per chosen response token, per pair (NLL on chosen).
            nll = -logps[:, 0] / tokens[:, 0].clamp(min=1)
            losses = losses + p.sft_loss_weight * nll
            metrics["nll_loss"] = _mean_entry(nll)
        metrics.update(
            {
                "loss": _mean_entry(losses),
                "rewards/chosen": _mean_entry(chosen_rewards),
                "rewards/rejected": _mean_entry(rejected_rewards),
                "rewards/accuracies": _mean_entry((chosen_rewards > rejected_rewards).float()),
                "rewards/margins": _mean_entry(chosen_rewards - rejected_rewards),
                "logps/chosen": _mean_entry(logps[:, 0]),
                "logps/rejected": _mean_entry(logps[:, 1]),
            }
        )
        # Summed over pairs, counted in pairs: Megatron divides by the global batch's pair count.
        # Under CP every rank holds the same pair losses: one rank counts the pairs and reports them.
        first = parallel_state.get_context_parallel_rank() == 0
        count = torch.tensor(losses.numel() if first else 0, dtype=torch.int, device=losses.device)
        if not first:
            metrics = {k: torch.zeros_like(v) for k, v in metrics.items()}
        return losses.sum(), count, metrics
