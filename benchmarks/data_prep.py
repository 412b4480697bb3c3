"""Pretraining tokenization throughput: ``data_prep pretrain`` vs a Megatron-LM-style baseline.

The baseline mirrors what Megatron-LM's ``tools/preprocess_data.py`` does (written here from its
description, not copied): a ``multiprocessing.Pool`` whose workers ``json.loads`` each line and
call the Hugging Face tokenizer's per-document ``encode``, ``imap`` back to the parent, which feeds
``IndexedDatasetBuilder.add_document``. Both runs read the same JSONL files with the same
tokenizer; the outputs must be byte-identical. Prints tokens/s for each and the ratio.

Usage: ``python benchmarks/data_prep.py [--files 8] [--copies 3] [--workers 2]``.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import random
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

# This file is named like the package it measures: import the package, not this script.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from data_prep.corpus import write_pretrain_corpus  # noqa: E402
from data_prep.indexed import optimal_dtype  # noqa: E402
from data_prep.pretrain import PretrainConfig, run_pretrain  # noqa: E402
from data_prep.tokenizer import tokenizer_info  # noqa: E402
from data_prep.train_tokenizer import train_tokenizer  # noqa: E402

_tokenizer: Tokenizer | None = None
_eod = 0


def _baseline_init(path: str, eod: int) -> None:
    global _tokenizer, _eod
    _tokenizer, _eod = Tokenizer.from_file(path), eod


def _baseline_encode(line: str) -> list[int]:
    ids = _tokenizer.encode(json.loads(line)["text"], add_special_tokens=False).ids
    ids.append(_eod)
    return ids


def run_baseline(files: list[str], tokenizer: str, prefix: str, workers: int) -> int:
    """Megatron-LM-style preprocessing; returns the number of tokens written."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    info = tokenizer_info(tokenizer)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=optimal_dtype(info.vocab_size))
    tokens = 0
    with Pool(workers, initializer=_baseline_init, initargs=(info.path, info.eod_id)) as pool:
        for path in files:
            with open(path, encoding="utf-8") as lines:
                for ids in pool.imap(_baseline_encode, lines, 32):
                    builder.add_document(ids, [len(ids)])
                    tokens += len(ids)
    builder.finalize(prefix + ".idx")
    return tokens


def make_inputs(root: Path, files: int, copies: int) -> tuple[list[str], str]:
    """``files`` JSONL files of ``copies`` shuffled copies each of the CPython-docs corpus (~2 MB),
    and a tokenizer trained on that corpus."""
    corpus = write_pretrain_corpus(root / "corpus")
    tokenizer = train_tokenizer([str(p) for p in corpus], root / "tokenizer")
    lines = [line for path in corpus for line in path.read_text(encoding="utf-8").splitlines()]
    paths = []
    for k in range(files):
        path = root / "inputs" / f"part-{k:03d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as out:
            for c in range(copies):
                random.Random(k * copies + c).shuffle(lines)
                out.write("\n".join(lines) + "\n")
        paths.append(str(path))
    return paths, str(tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=8, help="input files (one shard each)")
    parser.add_argument("--copies", type=int, default=3, help="copies of the ~2 MB corpus per file")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files, tokenizer = make_inputs(root, args.files, args.copies)
        size = sum(Path(f).stat().st_size for f in files)
        import megatron.core.datasets.indexed_dataset  # noqa: F401 - keep torch's import out of the timing

        start = time.perf_counter()
        base_tokens = run_baseline(files, tokenizer, str(root / "baseline"), args.workers)
        base_seconds = time.perf_counter() - start

        start = time.perf_counter()
        stats = run_pretrain(
            PretrainConfig(
                inputs=files,
                tokenizer=tokenizer,
                output_prefix=str(root / "data_prep"),
                workers=args.workers,
                progress=False,
            )
        )
        ours_seconds = time.perf_counter() - start

        identical = all(
            filecmp.cmp(root / f"baseline{s}", root / f"data_prep{s}", shallow=False)
            for s in (".bin", ".idx")
        )
        if stats["tokens"] != base_tokens or not identical:
            raise SystemExit(
                f"outputs differ: {stats['tokens']} vs {base_tokens} tokens, identical={identical}"
            )
        base_rate, ours_rate = base_tokens / base_seconds, stats["tokens"] / ours_seconds
        print(
            f"input: {len(files)} files, {size / 1e6:.1f} MB, {stats['documents']} documents, "
            f"{stats['tokens']} tokens, dtype {np.dtype(stats['dtype']).name}, workers {args.workers}"
        )
        print(
            f"baseline (Megatron-style Pool + encode + IndexedDatasetBuilder): {base_rate:,.0f} tokens/s "
            f"({base_seconds:.2f} s)"
        )
        print(
            f"data_prep pretrain (engine {'+'.join(stats['engine'])}): {ours_rate:,.0f} tokens/s "
            f"({ours_seconds:.2f} s)"
        )
        print(f"outputs byte-identical: {identical}; speed-up: {ours_rate / base_rate:.1f}x")


if __name__ == "__main__":
    main()
