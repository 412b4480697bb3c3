"""What the ``sft`` and ``dpo`` commands share: their options, the run's error policy, tokenizer
facts and encoder, the input records, the length check and the published output (Parquet with the
metadata the datasets check, and its ``.stats.json``, both renamed into place together)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from data_prep.chat import TEMPLATE_PATH
from data_prep.errors import BadRecord, ErrorPolicy, OnError, OutputLimits
from data_prep.pretrain import expand_inputs
from data_prep.readers import iter_records
from data_prep.storage import OutputSet, write_json, write_parquet
from data_prep.tokenizer import Engine, make_encoder, tokenizer_info


@dataclass(frozen=True)
class PrepOptions:
    """How a chat-data command treats bad records, and which tokenizer engine it runs."""

    on_error: OnError = "fail"
    engine: Engine = "auto"
    limits: OutputLimits | None = None


def template_sha256() -> str:
    """The chat template's hash, stored with every output made with it."""
    return hashlib.sha256(TEMPLATE_PATH.read_bytes()).hexdigest()


class ChatPrep:
    """One run: its error policy, its tokenizer's facts and an encoder."""

    def __init__(self, tokenizer: str, options: PrepOptions) -> None:
        self.policy = ErrorPolicy(options.on_error, options.limits)
        self.info = tokenizer_info(tokenizer)
        self.encoder = make_encoder(tokenizer, options.engine)

    def records(self, inputs: list[str]) -> Iterator[tuple[str, int, dict[str, Any]]]:
        """``(path, line, record)`` of every input file (globs expanded) in order."""
        for path in expand_inputs(inputs):
            for line, record in iter_records(path, self.policy):
                yield path, line, record

    def too_long(self, path: str, line: int, length: int, seq_length: int) -> bool:
        """Whether a record exceeds ``seq_length`` (then handled as a ``too_long`` bad record)."""
        if length <= seq_length:
            return False
        self.policy.handle(BadRecord(path, line, "too_long", f"{length} tokens > --seq-length {seq_length}"))
        return True

    def publish(
        self, output: str, table: pa.Table, fmt: str, seq_length: int, stats: dict[str, Any]
    ) -> dict[str, Any]:
        """Write ``output`` (``fmt``, this run's tokenizer and template) and its stats; returns them."""
        meta = {
            "format": fmt,
            "seq_length": seq_length,
            "pad_id": self.info.pad_id,
            "tokenizer_sha256": self.info.sha256,
            "template_sha256": template_sha256(),
        }
        with OutputSet() as out:
            write_parquet(out.stage(output), table, meta)
            write_json(out.stage(f"{output}.stats.json"), stats)
        return stats
