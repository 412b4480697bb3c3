"""Data and recipes for the QAT tests.

The demo corpus is a poor probe of quantization at toy scale: a 64-wide model that has learned
little more than token statistics loses almost nothing to INT4 (PTQ costs ~0.005 nats there), so
the QAT-vs-PTQ comparison would measure training noise.  The tests instead memorise a fixed set of
random documents over a small alphabet (every next token depends on its context, so attention and
MLP weights carry the function): the trained model is sharp, INT4 PTQ visibly hurts, and more
training on the same documents barely moves the unquantized loss.  The validation split holds the
same documents (the corpus is written twice and split 50/50), so its loss measures exactly what the
quantized model lost.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.indexed import DocumentWriter, optimal_dtype, publish

DOCS = 24
DOC_TOKENS = 63  # + EOD = 64 = the sequence length below: one document per sample
ALPHABET = 48
VOCAB = 8192
EOD = 1


def write_memorization_corpus(prefix: Path, seed: int = 0) -> Path:
    """``DOCS`` random documents over ``ALPHABET`` token ids, written twice (train copy, valid copy)."""
    rng = np.random.default_rng(seed)
    symbols = rng.choice(np.arange(3, VOCAB), size=ALPHABET, replace=False)
    docs = [np.append(rng.choice(symbols, size=DOC_TOKENS), EOD) for _ in range(DOCS)]
    prefix.parent.mkdir(parents=True, exist_ok=True)
    writer = DocumentWriter(prefix, optimal_dtype(VOCAB))
    for _copy in range(2):
        for doc in docs:
            writer.add(doc, np.array([len(doc)]))
    writer.finish()
    publish(prefix)
    return prefix


def memorization_overrides(prefix: Path, tokenizer: Path, cache: Path) -> list[str]:
    return [
        f"data.tokenizer={tokenizer}",
        "data.blend=null",
        f"data.paths=[{prefix}]",
        'data.split="50,50,0"',
        f"data.cache_dir={cache}",
        "model.mtp_enabled=true",
        "train.seq_length=64",
        "train.micro_batch_size=8",
        "train.global_batch_size=8",
        "train.rampup_batch_size=null",
    ]
