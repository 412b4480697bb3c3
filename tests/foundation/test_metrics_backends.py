"""TensorBoard and wandb (offline) record the scalars the log line and ``metrics.jsonl`` hold: both
are read back from what they wrote to disk (docs/pretraining.md, "Logging")."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from joyai_megatron.training.metrics import MetricsLogger
from tests.foundation.foundation_helpers import load_tiny

STEPS = {
    1: {"loss": 9.5, "lm_loss": 9.0, "mtp_loss": 5.0, "lr": 1e-4, "grad_norm": 0.75, "moe/bias max": 0.01},
    2: {"loss": 8.5, "lm_loss": 8.0, "mtp_loss": 4.5, "lr": 2e-4, "grad_norm": 0.5, "moe/bias max": 0.02},
}


def _wandb_history(run_file: Path) -> dict[int, dict[str, float]]:
    """History rows of an offline ``run-*.wandb`` file: a 7-byte W&B header, then LevelDB-log
    records (32 KiB blocks; 7-byte record headers: crc, length, type FULL/FIRST/MIDDLE/LAST) each
    holding one ``wandb_internal_pb2.Record``; wandb ships no reader for it."""
    from wandb.proto import wandb_internal_pb2

    raw = run_file.read_bytes()
    assert raw.startswith(b":W&B"), run_file

    def payloads() -> Iterator[bytes]:
        pos, block, pending = 7, 32768, b""
        while pos + 7 <= len(raw):
            left = block - pos % block
            if left < 7:  # block trailer padding
                pos += left
                continue
            _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
            pending += raw[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # FULL or LAST
                yield pending
                pending = b""

    rows = {}
    for data in payloads():
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            row = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            step = int(row.get("_step", record.history.step.num))
            rows[step] = {k: v for k, v in row.items() if not k.startswith("_")}
    return rows


def test_tensorboard_and_wandb_record_the_logged_scalars(tmp_path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = load_tiny(tmp_path, "logging.tensorboard=true", "logging.wandb_project=joyai-test")
    logger = MetricsLogger(recipe, is_writer=True, flops_per_token=1e6, world_size=1)
    for step, values in STEPS.items():
        logger.count_tokens(1024)
        logger.log(step, len(STEPS), values)
    logger.close()
    log_dir = tmp_path / "logs"

    jsonl = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in jsonl] == [1, 2]
    logged = {r["step"]: {k: v for k, v in r.items() if k != "step"} for r in jsonl}

    events = EventAccumulator(str(log_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert tags == set(logged[1]), tags ^ set(logged[1])
    for tag in tags:
        got = {e.step: e.value for e in events.Scalars(tag)}
        assert got == pytest.approx({s: logged[s][tag] for s in logged}, rel=1e-6), tag

    # wandb offline: every history row of the run file `wandb sync` would upload.
    run_files = list((log_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, run_files
    # wandb-core writes the file from its own process; finish() can return before the last rows land.
    deadline = time.monotonic() + 60
    while len(history := _wandb_history(run_files[0])) < len(logged) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert sorted(history) == [1, 2]
    for step, values in logged.items():
        assert history[step] == pytest.approx(values, rel=1e-9), step
