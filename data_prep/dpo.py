"""``data_prep dpo``: preference pairs -> tokenized chosen/rejected conversations with masks.

Input records: ``prompt`` (a string = one user turn, or a list of messages) and ``chosen`` /
``rejected`` (a string = one assistant reply, or a list of messages that continue the prompt).
Both sides are rendered with the chat template; the mask covers only the response's assistant
tokens, never assistant turns inside the prompt.

Stored format (Parquet; metadata ``format`` ``joyai-preference/1``, ``seq_length``, ``pad_id``):
``chosen_input_ids`` / ``rejected_input_ids`` list<int32> and ``chosen_assistant_mask`` /
``rejected_assistant_mask`` list<uint8>, unpadded. :class:`PreferenceDataset` pads them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from data_prep.chat import encode_rendered, parse_conversation, parse_messages, render
from data_prep.chat_prep import ChatPrep, PrepOptions
from data_prep.errors import BadRecord, DataPrepError
from data_prep.sft import shift_labels
from data_prep.storage import list_column, read_parquet

PREFERENCE_FORMAT = "joyai-preference/1"
SIDES = ("chosen", "rejected")


def _side_messages(record: dict[str, Any], key: str, role: str, path: str, line: int) -> list[dict[str, Any]]:
    if key not in record:
        raise BadRecord(path, line, "missing_key", f"no key {key!r} (keys: {sorted(record)[:8]})")
    value = record[key]
    if isinstance(value, str):
        value = [{"role": role, "content": value}]
    elif isinstance(value, dict):
        value = [value]
    return parse_messages(value, path, line, key)


def _render_pair(record: dict[str, Any], path: str, line: int) -> list[tuple[str, list[tuple[int, int]]]]:
    """Chosen and rejected renderings, each with only its response's generation spans."""
    prompt = _side_messages(record, "prompt", "user", path, line)
    prompt_replies = sum(m["role"] == "assistant" for m in prompt)
    out = []
    for side in SIDES:
        response = _side_messages(record, side, "assistant", path, line)
        if not any(m["role"] == "assistant" for m in response):
            raise BadRecord(path, line, "no_assistant", f"{side!r} has no assistant message")
        conversation = parse_conversation(
            {
                "messages": prompt + response,
                "tools": record.get("tools"),
                "enable_thinking": record.get("enable_thinking"),
            },
            path,
            line,
            True,
        )
        text, spans = render(conversation)
        out.append((text, spans[prompt_replies:]))
    return out


def prepare_dpo(
    inputs: list[str], tokenizer: str, output: str, seq_length: int, options: PrepOptions = PrepOptions()
) -> dict[str, Any]:
    """Validate, render and tokenize preference pairs; writes ``output`` and its ``.stats.json``.

    A pair whose chosen and rejected replies are the same text teaches nothing (its DPO gradient is
    zero): such pairs are kept but counted as ``identical_pair`` warnings, and a set made only of
    them is refused.
    """
    job = ChatPrep(tokenizer, options)
    policy = job.policy
    sources, rendered = [], []
    records = 0
    for path, line, record in job.records(inputs):
        records += 1
        try:
            rendered.extend(_render_pair(record, path, line))
            sources.append((path, line))
        except BadRecord as err:
            policy.handle(err)
    encoded = encode_rendered(job.encoder, rendered)
    columns: dict[str, list[np.ndarray]] = {
        f"{s}_{c}": [] for s in SIDES for c in ("input_ids", "assistant_mask")
    }
    for k, (path, line) in enumerate(sources):
        pair = encoded[2 * k : 2 * k + 2]
        if job.too_long(path, line, max(len(ids) for ids, _ in pair), seq_length):
            continue
        if np.array_equal(pair[0][0], pair[1][0]):
            policy.warn("identical_pair")
        for side, (ids, mask) in zip(SIDES, pair, strict=True):
            columns[f"{side}_input_ids"].append(ids)
            columns[f"{side}_assistant_mask"].append(mask)
    kept = len(columns["chosen_input_ids"])
    policy.check_outcome(kept, "preference pairs", output)
    if kept and policy.warnings["identical_pair"] == kept:
        raise DataPrepError(
            "unusable preference data", output, f"all {kept} pairs have chosen == rejected",
            "check which fields hold the chosen and the rejected reply",
        )  # fmt: skip
    table = pa.table(
        {
            name: pa.array(values, type=pa.list_(pa.int32() if name.endswith("ids") else pa.uint8()))
            for name, values in columns.items()
        }
    )
    stats = {
        "output": output,
        "records": records,
        "pairs": table.num_rows,
        "seq_length": seq_length,
        "tokens": int(sum(len(ids) for side in SIDES for ids in columns[f"{side}_input_ids"])),
        "skipped": dict(sorted(policy.skipped.items())),
        "warnings": dict(sorted(policy.warnings.items())),
        "engine": job.encoder.name,
    }
    return job.publish(output, table, PREFERENCE_FORMAT, seq_length, stats)


class PreferenceDataset:
    """Pairs of a ``data_prep dpo`` file, each side padded to ``seq_length`` (file's by default).

    Items hold, for ``side`` in chosen/rejected: ``{side}_tokens`` int64, ``{side}_labels`` int64
    (next token, ``pad_id`` past the end), ``{side}_loss_mask`` float32 (1 where the label is a
    response token), ``{side}_length`` (unpadded token count).
    """

    def __init__(self, path: str, seq_length: int | None = None) -> None:
        table, self.metadata = read_parquet(path, PREFERENCE_FORMAT)
        self.seq_length: int = seq_length or self.metadata["seq_length"]
        if self.seq_length < self.metadata["seq_length"]:
            raise ValueError(
                f"seq_length={seq_length} is shorter than the file's {self.metadata['seq_length']}"
            )
        self.pad_id: int = self.metadata["pad_id"]
        self._columns = {name: list_column(table, name) for name in table.column_names}
        self._rows = table.num_rows

    def __len__(self) -> int:
        return self._rows

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self._rows:
            raise IndexError(index)
        item: dict[str, Any] = {}
        for side in SIDES:
            ids_values, ids_offsets = self._columns[f"{side}_input_ids"]
            mask_values, _ = self._columns[f"{side}_assistant_mask"]
            lo, hi = ids_offsets[index], ids_offsets[index + 1]
            tokens = np.full(self.seq_length, self.pad_id, dtype=np.int64)
            mask = np.zeros(self.seq_length, dtype=np.uint8)
            tokens[: hi - lo] = ids_values[lo:hi]
            mask[: hi - lo] = mask_values[lo:hi]
            labels, loss_mask = shift_labels(tokens, mask, np.array([0, self.seq_length]), self.pad_id)
            item.update(
                {
                    f"{side}_tokens": tokens,
                    f"{side}_labels": labels,
                    f"{side}_loss_mask": loss_mask,
                    f"{side}_length": int(hi - lo),
                }
            )
        return item
