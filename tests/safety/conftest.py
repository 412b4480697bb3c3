"""One tiny 2-rank ZeRO-1 run shared by the whole fault suite (trained once, copied per test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.joyai_helpers import run_joyai, write_mock_recipe
from tests.safety.fault_helpers import SECTIONS, Run


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Steps 1 and 2 of a 2-process ZeRO-1 run (iter_0000001, iter_0000002), never modified."""
    directory = tmp_path_factory.mktemp("trained")
    recipe = write_mock_recipe(directory, **SECTIONS)
    result = run_joyai("pretrain", recipe, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return Run(recipe, directory / "ckpt")


@pytest.fixture(scope="session")
def exported(trained: Run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Hugging Face export of the shared run's newest checkpoint, never modified."""
    from joyai_megatron.convert.to_hf import export_to_hf

    output = tmp_path_factory.mktemp("exported") / "hf"
    export_to_hf(trained.ckpt, output, max_shard_bytes=2 << 20, progress=False)
    return output


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo byte-level BPE tokenizer, trained on the generated corpus (a few seconds)."""
    from data_prep.demo import make_corpus
    from data_prep.train_tokenizer import train_tokenizer

    corpus = tmp_path_factory.mktemp("corpus")
    make_corpus(corpus)
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([str(corpus / "**" / "*.jsonl")], out)
    return out
