"""Supervised fine-tuning: packed chat rows (``data_prep sft``), loss on assistant tokens only.

Each row holds whole conversations back to back; ``cu_seqlens`` confines attention (and MTP's
token roll) to one conversation, positions restart per conversation, and the loss mask is the
chat template's ``{% generation %}`` span shifted onto the labels, so system, user, tool and
prompt tokens are never predicted.  Rows are right-padded to ``train.seq_length`` (the padding is
one extra masked segment) so every micro-batch has the shape the pipeline schedule expects.

Thinking and non-thinking data: a packed row mixes conversations, so the share of thinking data is
set by blending two packed files (``sft.thinking_path`` at ``sft.thinking_ratio`` of the rows,
``data.sft_path`` for the rest); with one file the data's own mix is kept.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from joyai_megatron.stages.pretrain import check_vocab, forward_packed
from joyai_megatron.stages.sampling import ShuffledBlend
from joyai_megatron.training import checkpoint as ckpt
from joyai_megatron.training.packing import pack_batch
from joyai_megatron.training.stage import Stage
from joyai_megatron.training.tokenizer import HFTokenizer

ROW_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def check_start_checkpoint(recipe: Any) -> None:
    """A post-training stage starts from ``checkpoint.load`` unless ``checkpoint.dir`` can resume."""
    c = recipe.checkpoint
    if ckpt.latest_iteration(c.dir) is None and c.load:
        ckpt.resolve_checkpoint(c.load)  # raises, naming the path, when nothing complete is there


def open_packed_sft(path: str, key: str, seq_length: int) -> Any:
    """A ``data_prep sft`` file padded to ``seq_length``; errors name the recipe key."""
    from data_prep.sft import PackedSFTDataset

    if not Path(path).is_file():
        raise FileNotFoundError(f"{key}: {path} does not exist (build it with `python -m data_prep sft`)")
    try:
        dataset = PackedSFTDataset(path, pad_to=seq_length)
    except ValueError as err:
        raise ValueError(f"{key}: {path}: {err} (set train.seq_length >= the file's packing length)") from err
    if len(dataset) == 0:
        raise ValueError(f"{key}: {path} has no rows")
    return dataset


def collate_packed_rows(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack rows; concatenate their ``cu_seqlens``, each offset by the tokens of the rows before
    it, so the micro-batch flattens into one THD sequence with the same segments."""
    out = {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in ROW_KEYS}
    bounds, offset = [torch.zeros(1, dtype=torch.int32)], 0
    for sample in samples:
        cu = torch.as_tensor(sample["cu_seqlens"], dtype=torch.int32)
        if int(cu[0]) != 0 or int(cu[-1]) != len(sample["tokens"]):
            raise ValueError(
                f"cu_seqlens {cu.tolist()} does not span the row of {len(sample['tokens'])} tokens"
            )
        bounds.append(cu[1:] + offset)
        offset += len(sample["tokens"])
    out["cu_seqlens"] = torch.cat(bounds)
    return out


class SFTStage(Stage):
    name = "sft"
    supports_context_parallel = True

    def _check_tokenizer(self, datasets: list[tuple[str, Any]]) -> None:
        """The files must come from one tokenizer, the recipe's if it names one."""
        from data_prep.tokenizer import tokenizer_info

        shas = {path: ds.metadata.get("tokenizer_sha256") for path, ds in datasets}
        if self.recipe.data.tokenizer:
            check_vocab(HFTokenizer(self.recipe.data.tokenizer), self.recipe)
            expected = tokenizer_info(self.recipe.data.tokenizer).sha256
            wrong = [p for p, sha in shas.items() if sha and sha != expected]
            if wrong:
                raise ValueError(
                    f"{', '.join(wrong)}: tokenized with a different tokenizer than data.tokenizer "
                    f"{self.recipe.data.tokenizer}"
                )
        elif len(set(shas.values())) > 1:
            raise ValueError(f"SFT files come from different tokenizers: {shas}")

    @classmethod
    def check_recipe(cls, recipe: Any) -> None:
        d, s, t = recipe.data, recipe.sft, recipe.train
        if not d.sft_path:
            raise ValueError("data.sft_path must name a packed SFT file (python -m data_prep sft)")
        if (s.thinking_ratio is None) != (s.thinking_path is None):
            raise ValueError(
                "sft.thinking_ratio and sft.thinking_path go together: the ratio blends rows of the thinking "
                "file with rows of data.sft_path (one mixed file keeps its own mix: leave both unset)"
            )
        if s.thinking_ratio is not None and not 0.0 <= s.thinking_ratio <= 1.0:
            raise ValueError(f"sft.thinking_ratio must be in [0, 1], got {s.thinking_ratio}")
        if t.eval_interval and not s.valid_path:
            raise ValueError("train.eval_interval > 0 needs sft.valid_path (a packed SFT file)")
        for key, path in (("data.sft_path", d.sft_path), ("sft.thinking_path", s.thinking_path)):
            if path and not Path(path).is_file():
                raise FileNotFoundError(
                    f"{key}: {path} does not exist (build it with `python -m data_prep sft`)"
                )
        if t.eval_interval and not Path(s.valid_path).is_file():
            raise FileNotFoundError(f"sft.valid_path: {s.valid_path} does not exist")
        check_start_checkpoint(recipe)

    def build_datasets(self, train_samples: int, valid_samples: int) -> dict[str, Any]:
        d, s, t = self.recipe.data, self.recipe.sft, self.recipe.train
        sources = [("data.sft_path", d.sft_path)]
        if s.thinking_path:
            sources.append(("sft.thinking_path", s.thinking_path))
        opened = [(path, open_packed_sft(path, key, t.seq_length)) for key, path in sources]
        valid = open_packed_sft(s.valid_path, "sft.valid_path", t.seq_length) if t.eval_interval else None
        self._check_tokenizer(opened + ([(s.valid_path, valid)] if valid is not None else []))
        weights = [1.0] if s.thinking_ratio is None else [1.0 - s.thinking_ratio, s.thinking_ratio]
        train = ShuffledBlend([ds for _, ds in opened], weights, train_samples, seed=t.seed)
        self.datasets = {"train": train}
        if valid is not None:
            self.datasets["valid"] = valid
        return self.datasets

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate_packed_rows(samples)

    def forward_step(self, data_iterator: Iterator, model: torch.nn.Module):
        batch = next(data_iterator)
        packed = pack_batch(
            batch["tokens"],
            batch["labels"],
            batch["loss_mask"],
            batch["position_ids"],
            cu_seqlens=batch["cu_seqlens"],
        )
        return forward_packed(model, packed, self.recipe.parallel.sequence_parallel)
