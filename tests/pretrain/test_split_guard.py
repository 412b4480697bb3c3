"""A data split that leaves a dataset's validation part empty is refused with the key and the file,
instead of Megatron-Core's endless epoch count (what a 99990/10 split of a small corpus did)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from joyai_megatron.stages.pretrain import check_split_not_empty


class _Tokenizer:
    eod, pad, vocab_size = 1, 1, 100
    unique_identifiers = {"class": "test"}


def _dataset(tmp_path, documents: int) -> str:
    prefix = str(tmp_path / "docs")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for i in range(documents):
        builder.add_document(torch.arange(2, 40 + i), [38 + i])
    builder.finalize(prefix + ".idx")
    return prefix


def _config(prefix: str, split: str) -> GPTDatasetConfig:
    return GPTDatasetConfig(
        random_seed=1, sequence_length=16, blend=([prefix], None), split=split, tokenizer=_Tokenizer(),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, path_to_cache=None,
    )  # fmt: skip


def test_empty_validation_split_is_named(tmp_path) -> None:
    prefix = _dataset(tmp_path, 20)
    with pytest.raises(
        ValueError, match=r"data.split '99990,10,0' gives the validation split of .*docs none of its 20"
    ):
        check_split_not_empty(_config(prefix, "99990,10,0"), [8, 1, 0], "99990,10,0")
    check_split_not_empty(_config(prefix, "90,10,0"), [8, 1, 0], "90,10,0")  # 2 documents: fine
    check_split_not_empty(_config(prefix, "99990,10,0"), [8, 0, 0], "99990,10,0")  # no samples asked
