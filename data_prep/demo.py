"""``data_prep demo``: every artifact the tiny CPU recipes need, built from nothing in ~5-10 s.

Layout under DIR: ``corpus/`` (make-corpus), ``tokenizer/`` (train-tokenizer),
``pretrain/{topics,docstrings}.{bin,idx}``, ``blend.yaml``, ``sft/{train,eval}.parquet``,
``dpo/{train,eval}.parquet``, ``rl/{train,eval}.jsonl``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from data_prep.corpus import write_pretrain_corpus
from data_prep.dpo import prepare_dpo
from data_prep.pretrain import PretrainConfig, run_pretrain
from data_prep.rl import prepare_rl
from data_prep.sft import prepare_sft
from data_prep.synthetic import write_synthetic_sets
from data_prep.train_tokenizer import DEFAULT_VOCAB_SIZE, train_tokenizer


def make_corpus(output: Path, seed: int = 1234) -> list[Path]:
    """The pretraining text plus the seeded SFT/DPO/RL sets."""
    return write_pretrain_corpus(output) + write_synthetic_sets(output, seed)


def build_demo(
    output: Path, seq_length: int = 512, workers: int = 1, progress: bool = True
) -> dict[str, Any]:
    """Build everything; returns each step's stats keyed by artifact."""
    corpus, tokenizer = output / "corpus", output / "tokenizer"
    make_corpus(corpus)
    train_tokenizer([str(corpus / "**" / "*.jsonl")], tokenizer, DEFAULT_VOCAB_SIZE)
    stats: dict[str, Any] = {}
    for name, pattern in (("topics", "topics.jsonl"), ("docstrings", "docstrings-*.jsonl")):
        stats[f"pretrain/{name}"] = run_pretrain(
            PretrainConfig(
                inputs=[str(corpus / "pretrain" / pattern)],
                tokenizer=str(tokenizer),
                output_prefix=str(output / "pretrain" / name),
                workers=workers,
                progress=progress,
            )
        )
    blend = {
        "datasets": [
            {"prefix": "pretrain/topics", "weight": 1},
            {"prefix": "pretrain/docstrings", "weight": 3},
        ]
    }
    (output / "blend.yaml").write_text(yaml.safe_dump(blend, sort_keys=False))
    for split in ("train", "eval"):
        stats[f"sft/{split}"] = prepare_sft(
            [str(corpus / "sft" / f"{split}.jsonl")],
            str(tokenizer),
            str(output / "sft" / f"{split}.parquet"),
            seq_length,
        )
        stats[f"dpo/{split}"] = prepare_dpo(
            [str(corpus / "dpo" / f"{split}.jsonl")],
            str(tokenizer),
            str(output / "dpo" / f"{split}.parquet"),
            seq_length,
        )
        stats[f"rl/{split}"] = prepare_rl(
            [str(corpus / "rl" / f"{split}.jsonl")], str(tokenizer), str(output / "rl" / f"{split}.jsonl")
        )
    return stats
