"""Session fixtures: the generated corpus and the demo tokenizer, built once (~5 s)."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_prep.demo import make_corpus
from data_prep.train_tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    make_corpus(root)
    return root


@pytest.fixture(scope="session")
def tokenizer_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([str(corpus / "**" / "*.jsonl")], out)
    return out
