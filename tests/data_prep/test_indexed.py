"""The NumPy IndexedDataset writer and merge are byte-identical to Megatron-Core's builder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from data_prep import indexed


def _docs(seed: int, vocab: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=rng.integers(1, 300)) for _ in range(50)]


def _builder_write(prefix: Path, docs: list[np.ndarray], dtype: type[np.number]) -> None:
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in docs:
        builder.add_document(doc, [len(doc)])
    builder.finalize(f"{prefix}.idx")


def _ours_write(prefix: Path, docs: list[np.ndarray], dtype: type[np.number]) -> None:
    writer = indexed.DocumentWriter(prefix, dtype)
    for chunk in (docs[:20], docs[20:]):
        writer.add(np.concatenate(chunk), np.array([len(d) for d in chunk]))
    writer.finish()
    assert not Path(f"{prefix}.bin").exists(), "must stay under its temporary name until published"
    indexed.publish(prefix)


def _same_files(a: Path, b: Path) -> bool:
    return all(Path(f"{a}{s}").read_bytes() == Path(f"{b}{s}").read_bytes() for s in (".bin", ".idx"))


@pytest.mark.parametrize(("dtype", "vocab"), [(np.uint16, 8192), (np.int32, 129280)])
def test_writer_and_merge_match_megatron_builder(tmp_path: Path, dtype: type[np.number], vocab: int) -> None:
    parts = [_docs(1, vocab), _docs(2, vocab)]
    for k, docs in enumerate(parts):
        _builder_write(tmp_path / f"ref{k}", docs, dtype)
        _ours_write(tmp_path / f"ours{k}", docs, dtype)
        assert _same_files(tmp_path / f"ref{k}", tmp_path / f"ours{k}")

    builder = IndexedDatasetBuilder(str(tmp_path / "ref_merged.bin"), dtype=dtype)
    for k in range(2):
        builder.add_index(str(tmp_path / f"ref{k}"))
    builder.finalize(str(tmp_path / "ref_merged.idx"))
    indexed.merge([str(tmp_path / "ours0"), str(tmp_path / "ours1")], str(tmp_path / "ours_merged"))
    assert _same_files(tmp_path / "ref_merged", tmp_path / "ours_merged")

    dataset = IndexedDataset(str(tmp_path / "ours_merged"))
    flat = parts[0] + parts[1]
    assert len(dataset) == len(flat)
    assert dataset[0].dtype == dtype
    assert all(np.array_equal(dataset[i], doc) for i, doc in enumerate(flat))


def test_dtype_rule_and_codes_match_megatron() -> None:
    for vocab in (256, 8192, 65499, 65500, 129280):
        assert indexed.optimal_dtype(vocab) == DType.optimal_dtype(vocab)
    for dtype, code in indexed.DTYPE_CODES.items():
        assert DType.code_from_dtype(dtype) == code


def test_empty_writer_matches_builder(tmp_path: Path) -> None:
    _builder_write(tmp_path / "ref", [], np.uint16)
    indexed.DocumentWriter(tmp_path / "ours", np.uint16).finish()
    indexed.publish(tmp_path / "ours")
    assert _same_files(tmp_path / "ref", tmp_path / "ours")
