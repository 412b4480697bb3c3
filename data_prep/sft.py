"""``data_prep sft``: chat conversations -> packed rows of token ids with assistant masks.

Stored format (Parquet, zstd; schema metadata ``joyai_data_prep`` = JSON with ``format``
``joyai-packed-sft/1``, ``seq_length``, ``pad_id``, ``tokenizer_sha256``, ``template_sha256``),
one row per packed sequence of at most ``seq_length`` tokens:

* ``input_ids`` list<int32>: the conversations of the row, back to back, no padding
* ``assistant_mask`` list<uint8>: 1 on tokens the assistant generates (unshifted)
* ``cu_seqlens`` list<int32>: conversation boundaries, ``[0, ..., len(input_ids)]``

:class:`PackedSFTDataset` turns a row into training tensors: labels shifted inside each
conversation, loss mask shifted with them, positions restarting at 0 per conversation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from data_prep.chat import encode_rendered, parse_conversation, render
from data_prep.chat_prep import ChatPrep, PrepOptions
from data_prep.errors import BadRecord
from data_prep.packing import best_fit_decreasing
from data_prep.storage import list_column, read_parquet

SFT_FORMAT = "joyai-packed-sft/1"
_ENCODE_CHUNK = 4096


def prepare_sft(
    inputs: list[str], tokenizer: str, output: str, seq_length: int, options: PrepOptions = PrepOptions()
) -> dict[str, Any]:
    """Validate, render, tokenize and pack; writes ``output`` and ``output``'s ``.stats.json``."""
    job = ChatPrep(tokenizer, options)
    sequences: list[tuple[np.ndarray, np.ndarray]] = []
    pending: list[tuple[tuple[str, int], tuple[str, list[tuple[int, int]]]]] = []
    conversations = 0

    def flush() -> None:
        for (path, line), (ids, mask) in zip(
            [p for p, _ in pending], encode_rendered(job.encoder, [r for _, r in pending]), strict=True
        ):
            if not job.too_long(path, line, len(ids), seq_length):
                sequences.append((ids, mask))
        pending.clear()

    for path, line, record in job.records(inputs):
        conversations += 1
        try:
            pending.append(((path, line), render(parse_conversation(record, path, line, True))))
        except BadRecord as err:
            job.policy.handle(err)
        if len(pending) >= _ENCODE_CHUNK:
            flush()
    flush()
    job.policy.check_outcome(len(sequences), "conversations", output)
    rows = best_fit_decreasing([len(ids) for ids, _ in sequences], seq_length)
    table = pa.table(
        {
            "input_ids": pa.array(
                [np.concatenate([sequences[i][0] for i in row]) for row in rows], type=pa.list_(pa.int32())
            ),
            "assistant_mask": pa.array(
                [np.concatenate([sequences[i][1] for i in row]) for row in rows], type=pa.list_(pa.uint8())
            ),
            "cu_seqlens": pa.array(
                [np.concatenate([[0], np.cumsum([len(sequences[i][0]) for i in row])]) for row in rows],
                type=pa.list_(pa.int32()),
            ),
        }
    )
    tokens = sum(len(ids) for ids, _ in sequences)
    capacity = len(rows) * seq_length
    stats = {
        "output": output,
        "conversations": conversations,
        "sequences": len(sequences),
        "rows": len(rows),
        "seq_length": seq_length,
        "tokens": tokens,
        "assistant_tokens": int(sum(int(mask.sum()) for _, mask in sequences)),
        "padding_tokens": capacity - tokens,
        "padding_fraction": (capacity - tokens) / capacity if capacity else 0.0,
        "skipped": dict(sorted(job.policy.skipped.items())),
        "engine": job.encoder.name,
    }
    return job.publish(output, table, SFT_FORMAT, seq_length, stats)


def shift_labels(
    tokens: np.ndarray, mask: np.ndarray, cu_seqlens: np.ndarray, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Next-token labels and loss mask within each sequence; a sequence's last token gets neither."""
    labels = np.empty_like(tokens)
    labels[:-1] = tokens[1:]
    loss_mask = np.zeros(len(tokens), dtype=np.float32)
    loss_mask[:-1] = mask[1:]
    last = cu_seqlens[1:] - 1
    labels[last] = pad_id
    loss_mask[last] = 0.0
    return labels, loss_mask


class PackedSFTDataset:
    """Rows of a ``data_prep sft`` file as training samples (NumPy arrays).

    Each item: ``tokens`` int64, ``labels`` int64 (next token; ``pad_id`` where there is none),
    ``loss_mask`` float32 (1 where the label is an assistant token), ``position_ids`` int64
    (restart at 0 per conversation) and ``cu_seqlens`` int32 (``[0, ..., len(tokens)]``, for THD
    attention). With ``pad_to``, rows are right-padded to that length; the padding forms one extra
    masked sequence so ``cu_seqlens`` still ends at the total.
    """

    def __init__(self, path: str, pad_to: int | None = None) -> None:
        table, self.metadata = read_parquet(path, SFT_FORMAT)
        self.seq_length: int = self.metadata["seq_length"]
        self.pad_id: int = self.metadata["pad_id"]
        if pad_to is not None and pad_to < self.seq_length:
            raise ValueError(f"pad_to={pad_to} is shorter than the packed seq_length {self.seq_length}")
        self.pad_to = pad_to
        self._ids = list_column(table, "input_ids")
        self._mask = list_column(table, "assistant_mask")
        self._cu = list_column(table, "cu_seqlens")

    def __len__(self) -> int:
        return len(self._ids[1]) - 1

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(index)

        def row(column: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
            values, offsets = column
            return values[offsets[index] : offsets[index + 1]]

        tokens = row(self._ids).astype(np.int64)
        mask = row(self._mask)
        cu_seqlens = row(self._cu).astype(np.int32)
        if self.pad_to is not None and self.pad_to > len(tokens):
            extra = self.pad_to - len(tokens)
            tokens = np.concatenate([tokens, np.full(extra, self.pad_id, dtype=np.int64)])
            mask = np.concatenate([mask, np.zeros(extra, dtype=mask.dtype)])
            cu_seqlens = np.append(cu_seqlens, np.int32(self.pad_to))
        labels, loss_mask = shift_labels(tokens, mask, cu_seqlens, self.pad_id)
        starts = np.repeat(cu_seqlens[:-1], np.diff(cu_seqlens))
        return {
            "tokens": tokens,
            "labels": labels,
            "loss_mask": loss_mask,
            "position_ids": np.arange(len(tokens), dtype=np.int64) - starts,
            "cu_seqlens": cu_seqlens,
        }
