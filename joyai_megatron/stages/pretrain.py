"""Pretraining: Megatron-Core GPTDataset blends, packed documents, next-token loss (+ dense MTP)."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from joyai_megatron.model.presets import recipe_arch
from joyai_megatron.stages.logprobs import stage_padding_mask
from joyai_megatron.training.distributed import current_device
from joyai_megatron.training.packing import PackedBatch, pack_batch, split_for_context_parallel
from joyai_megatron.training.stage import Stage
from joyai_megatron.training.tokenizer import HFTokenizer


def resolve_blend(data: Any) -> tuple[list[str], list[float] | None]:
    """The recipe's ``data.blend`` YAML (via data_prep) or ``data.paths`` -> Megatron's blend."""
    if data.blend:
        from data_prep.blend import load_blend

        return load_blend(data.blend)
    if not data.paths:
        raise ValueError("recipe sets neither data.blend nor data.paths (nor data.mock=true)")
    for prefix in data.paths:
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                raise FileNotFoundError(
                    f"data.paths: {prefix + suffix} does not exist (run `python -m data_prep pretrain`)"
                )
    return list(data.paths), None


def check_vocab(tokenizer: HFTokenizer | None, recipe: Any) -> None:
    """Token ids beyond the embedding table fail deep inside the first forward; stop here instead."""
    vocab = recipe_arch(recipe).vocab_size
    if tokenizer is not None and tokenizer.vocab_size > vocab:
        raise ValueError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model's vocab_size is {vocab}; "
            "set model.arch.vocab_size or use the matching tokenizer"
        )


def forward_packed(model: torch.nn.Module, packed: PackedBatch, sequence_parallel: bool) -> tuple[Any, Any]:
    """The language-model forward of pretraining and SFT on a packed micro-batch: this CP rank's
    share of it on the device, the per-token loss, and the loss function the schedule calls."""
    packed = split_for_context_parallel(packed, sequence_parallel=sequence_parallel)
    packed = packed.to(current_device())
    output = packed_token_losses(
        model, packed, stage_padding_mask(model, packed.padding_mask(current_device()))
    )
    return output, partial(token_loss, packed.loss_mask)


def packed_token_losses(
    model: torch.nn.Module, packed: PackedBatch, padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The model's per-token loss on a packed (THD) micro-batch already on its device and CP rank."""
    return model(
        packed.tokens,
        packed.position_ids,
        None,
        labels=packed.labels,
        loss_mask=packed.loss_mask,
        packed_seq_params=packed.packed_seq_params,
        padding_mask=padding_mask,
    )


def token_loss(loss_mask: torch.Tensor, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Sum of masked per-token losses and the token count: Megatron-Core normalises by the total
    count across micro-batches and data-parallel ranks (``calculate_per_token_loss``)."""
    losses = output.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    total = torch.sum(losses * mask)
    count = mask.sum().to(torch.int)
    return total, count, {"lm loss": torch.stack([total.detach(), count.detach().float()])}


def check_split_not_empty(config: GPTDatasetConfig, sizes: list[int], split: str) -> None:
    """Megatron-Core loops forever computing epochs (gpt_dataset.py ``_get_num_epochs``) when a split
    it is asked samples from holds no sequence of a dataset: name the dataset and the key instead."""
    for prefix in config.blend[0]:
        low_level = GPTDataset.build_low_level_dataset(prefix, config)
        count = GPTDataset.numel_low_level_dataset(low_level)
        for name, bounds, wanted in zip(("train", "validation"), config.split_matrix, sizes, strict=False):
            if bounds is None or not wanted:
                continue
            if round(bounds[1] * count) <= round(bounds[0] * count):
                raise ValueError(
                    f"data.split {split!r} gives the {name} split of {prefix} none of its {count} sequences; "
                    "use a coarser split (e.g. '98,2,0') or more data"
                )


class PretrainStage(Stage):
    name = "pretrain"
    supports_context_parallel = True

    def build_datasets(self, train_samples: int, valid_samples: int) -> dict[str, Any]:
        d, t = self.recipe.data, self.recipe.train
        tokenizer = HFTokenizer(d.tokenizer) if d.tokenizer else None
        if tokenizer is None and not d.mock:
            raise ValueError("data.tokenizer must name a tokenizer directory (or set data.mock=true)")
        check_vocab(tokenizer, self.recipe)
        config = GPTDatasetConfig(
            random_seed=t.seed,
            sequence_length=t.seq_length,
            blend=None if d.mock else resolve_blend(d),
            split=d.split,
            path_to_cache=d.cache_dir,
            tokenizer=tokenizer or _MockTokenizer(self.recipe),
            reset_position_ids=d.reset_position_ids,
            reset_attention_mask=d.reset_attention_mask,
            eod_mask_loss=d.eod_mask_loss,
            create_attention_mask=False,  # documents are separated through cu_seqlens instead
            mid_level_dataset_surplus=0.005,
        )
        cls = MockGPTDataset if d.mock else GPTDataset
        sizes = [train_samples, max(valid_samples, 1), 0]
        if not d.mock:
            check_split_not_empty(config, sizes, d.split)
        train, valid, _ = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()
        self.datasets = {"train": train, "valid": valid}
        return self.datasets

    def forward_step(self, data_iterator: Iterator, model: torch.nn.Module):
        batch = next(data_iterator)
        position_ids = batch["position_ids"]
        if not self.recipe.data.reset_position_ids:
            # One segment per row: positions never restart inside it.
            position_ids = torch.arange(position_ids.shape[-1]).expand_as(position_ids)
        packed = pack_batch(batch["tokens"], batch["labels"], batch["loss_mask"], position_ids)
        return forward_packed(model, packed, self.recipe.parallel.sequence_parallel)


class _MockTokenizer:
    """What MockGPTDataset needs when no tokenizer is configured."""

    def __init__(self, recipe: Any) -> None:
        self.vocab_size = recipe_arch(recipe).vocab_size
        self.eod = 1
        self.pad = 1
        self.unique_identifiers = {"class": type(self).__name__, "vocab_size": self.vocab_size}
