"""``data_prep pretrain``: documents -> one Megatron IndexedDataset, one shard per input file.

Each input file becomes ``PREFIX.shards/NNNNN.{bin,idx,json}``; the JSON is written last and
records the shard's fingerprint (input size and mtime, tokenizer hash, options), so a rerun skips
every shard whose JSON matches and the merged output is byte-identical to an uninterrupted run.
Shards are merged in input order into ``PREFIX.partial.{bin,idx}``, renamed to ``PREFIX.{bin,idx}``
together with ``PREFIX.stats.json`` only when the whole run succeeded.
"""

from __future__ import annotations

import glob
import json
import multiprocessing as mp
import os
import queue
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_prep import indexed
from data_prep.errors import DataPrepError, ErrorPolicy, OnError, OutputLimits, check_outcome
from data_prep.readers import iter_texts
from data_prep.storage import OutputSet, write_json, write_json_atomic
from data_prep.tokenizer import Encoder, Engine, HFEncoder, make_encoder, tokenizer_info

DEFAULT_MAX_DOC_BYTES = 64 << 20
_BATCH_BYTES = 4 << 20  # text per encode call: big enough to amortise, small enough to stream


@dataclass(frozen=True)
class PretrainConfig:
    inputs: list[str]
    tokenizer: str
    output_prefix: str
    text_key: str = "text"
    workers: int = 1
    engine: Engine = "auto"
    on_error: OnError = "fail"
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES
    eod_token: str | None = None
    verify_bytes: int = 16 << 10
    keep_shards: bool = False
    progress: bool = True
    limits: OutputLimits = field(default_factory=OutputLimits)


@dataclass(frozen=True)
class ShardJob:
    index: int
    input: str
    prefix: str
    fingerprint: dict[str, Any]
    tokenizer: str
    eod_id: int
    dtype: str
    text_key: str
    max_doc_bytes: int
    on_error: OnError
    engine: Engine
    parallel: bool
    verify_bytes: int


@dataclass
class ShardStats:
    input: str
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    engine: str = ""


def expand_inputs(patterns: list[str]) -> list[str]:
    """Sorted, de-duplicated files matching the globs; an empty match is an error."""
    files: set[str] = set()
    for pattern in patterns:
        matched = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
        if not matched:
            raise DataPrepError(f"--input {pattern!r} matches no file")
        files.update(os.path.abspath(p) for p in matched)
    return sorted(files)


def _verify(
    encoder: Encoder,
    texts: list[str],
    sizes: list[int],
    lines: list[int],
    flat: np.ndarray,
    lengths: np.ndarray,
    job: ShardJob,
) -> None:
    """Fail loudly if the fast engine disagrees with Hugging Face ``tokenizers`` on a sample.

    The sample is the batch's documents that fit in ``verify_bytes`` (the reference engine is ~50x
    slower, so its cost must stay bounded whatever the documents' sizes)."""
    budget, chosen = job.verify_bytes, []
    for i, size in enumerate(sizes):
        if size <= budget:
            chosen.append(i)
            budget -= size
    if not chosen:
        chosen = [int(np.argmin(sizes))]
    ref_flat, ref_lengths = HFEncoder(job.tokenizer).encode_flat([texts[i] for i in chosen])
    ends, ref_ends = np.cumsum(lengths), np.cumsum(ref_lengths)
    for k, i in enumerate(chosen):
        got = flat[ends[i] - lengths[i] : ends[i]]
        want = ref_flat[ref_ends[k] - ref_lengths[k] : ref_ends[k]]
        if not np.array_equal(got, want):
            raise DataPrepError(
                f"{job.input}:{lines[i]}: engine {encoder.name} differs from Hugging Face tokenizers; "
                "rerun with --engine hf"
            )


def tokenize_shard(job: ShardJob, report: Callable[[int, int], None]) -> ShardStats:
    """Tokenize one input file into its shard, calling ``report(documents, tokens)`` per batch."""
    start = time.perf_counter()
    policy = ErrorPolicy(job.on_error)
    encoder = make_encoder(job.tokenizer, job.engine, parallel=job.parallel)
    stats = ShardStats(input=job.input, engine=encoder.name)
    writer = indexed.DocumentWriter(job.prefix, np.dtype(job.dtype).type)
    texts: list[str] = []
    sizes: list[int] = []
    lines: list[int] = []
    pending = 0
    verified = job.verify_bytes <= 0 or encoder.name == "hf"

    def flush() -> None:
        nonlocal pending, verified
        flat, lengths = encoder.encode_flat(texts)
        if not verified:
            _verify(encoder, texts, sizes, lines, flat, lengths, job)
            verified = True
        tokens = np.insert(flat, np.cumsum(lengths), job.eod_id)
        writer.add(tokens, lengths + 1)
        stats.documents += len(texts)
        stats.tokens += int(tokens.size)
        report(len(texts), int(tokens.size))
        texts.clear()
        sizes.clear()
        lines.clear()
        pending = 0

    try:
        for line, text, size in iter_texts(job.input, job.text_key, job.max_doc_bytes, policy):
            texts.append(text)
            sizes.append(size)
            lines.append(line)
            pending += size
            stats.bytes += size
            if pending >= _BATCH_BYTES:
                flush()
        if texts:
            flush()
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    indexed.publish(job.prefix)
    stats.skipped = dict(policy.skipped)
    stats.seconds = time.perf_counter() - start
    write_json_atomic(Path(job.prefix + ".json"), {"fingerprint": job.fingerprint, "stats": asdict(stats)})
    return stats


def _finished_shard(job: ShardJob) -> ShardStats | None:
    """The stats of a shard completed by an earlier run with the same fingerprint."""
    marker = Path(job.prefix + ".json")
    if not (marker.is_file() and Path(job.prefix + ".bin").is_file() and Path(job.prefix + ".idx").is_file()):
        return None
    saved = json.loads(marker.read_text())
    return ShardStats(**saved["stats"]) if saved.get("fingerprint") == job.fingerprint else None


_worker_queue: Any = None


def _worker_init(progress: Any) -> None:
    global _worker_queue
    _worker_queue = progress
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already


def _worker_run(job: ShardJob) -> ShardStats:
    return tokenize_shard(job, lambda docs, tokens: _worker_queue.put((docs, tokens)))


def _run_jobs(jobs: list[ShardJob], workers: int, bar: tqdm) -> list[ShardStats]:
    written = 0

    def report(docs: int, tokens: int) -> None:
        nonlocal written
        written += tokens
        bar.set_postfix(tokens=f"{written:,}", refresh=False)
        bar.update(docs)

    if workers <= 1 or len(jobs) <= 1:
        return [tokenize_shard(job, report) for job in jobs]
    ctx = mp.get_context("spawn")  # no fork after Rust thread pools exist
    progress = ctx.Queue()
    with ctx.Pool(min(workers, len(jobs)), initializer=_worker_init, initargs=(progress,)) as pool:
        pending = [pool.apply_async(_worker_run, (job,)) for job in jobs]
        # Poll so the bar moves while workers run; stop at the first failed shard.
        while not all(r.ready() for r in pending):
            for r in pending:
                if r.ready() and not r.successful():
                    r.get()  # re-raises the worker's exception; the pool is terminated on exit
            try:
                report(*progress.get(timeout=0.05))
            except queue.Empty:
                continue
        while not progress.empty():
            report(*progress.get())
        return [result.get() for result in pending]


def run_pretrain(config: PretrainConfig) -> dict[str, Any]:
    """Tokenize, shard, merge; returns (and writes) the stats of the whole dataset."""
    start = time.perf_counter()
    inputs = expand_inputs(config.inputs)
    info = tokenizer_info(config.tokenizer, config.eod_token)
    dtype = indexed.optimal_dtype(info.vocab_size)
    prefix = os.path.abspath(config.output_prefix)
    shard_dir = Path(prefix + ".shards")
    shard_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for index, path in enumerate(inputs):
        status = os.stat(path)
        fingerprint = {
            "input": path,
            "size": status.st_size,
            "mtime_ns": status.st_mtime_ns,
            "tokenizer_sha256": info.sha256,
            "eod_id": info.eod_id,
            "dtype": dtype.__name__,
            "text_key": config.text_key,
            "max_doc_bytes": config.max_doc_bytes,
            "on_error": config.on_error,
        }
        jobs.append(
            ShardJob(
                index=index,
                input=path,
                prefix=str(shard_dir / f"{index:05d}"),
                fingerprint=fingerprint,
                tokenizer=info.path,
                eod_id=info.eod_id,
                dtype=dtype.__name__,
                text_key=config.text_key,
                max_doc_bytes=config.max_doc_bytes,
                on_error=config.on_error,
                engine=config.engine,
                parallel=config.workers > 1 and len(inputs) == 1,
                verify_bytes=config.verify_bytes,
            )
        )
    finished = {job.index: stats for job in jobs if (stats := _finished_shard(job)) is not None}
    todo = [job for job in jobs if job.index not in finished]
    with tqdm(desc="pretrain", unit="doc", disable=not config.progress, dynamic_ncols=True) as bar:
        bar.update(sum(s.documents for s in finished.values()))
        for job, stats in zip(todo, _run_jobs(todo, config.workers, bar), strict=True):
            finished[job.index] = stats
    shards = [finished[job.index] for job in jobs]
    skipped: Counter[str] = Counter()
    for stats in shards:
        skipped.update(stats.skipped)
    check_outcome(sum(s.documents for s in shards), skipped, config.limits, "documents", prefix + ".bin")
    # The merge writes a staging prefix; .bin, .idx and stats replace an older run's set together.
    staging = prefix + ".partial"
    indexed.merge([job.prefix for job in jobs], staging)
    elapsed = time.perf_counter() - start
    tokens = sum(s.tokens for s in shards)
    result = {
        "output_prefix": prefix,
        "documents": sum(s.documents for s in shards),
        "tokens": tokens,
        "bytes": sum(s.bytes for s in shards),
        "skipped": dict(sorted(skipped.items())),
        "seconds": round(elapsed, 3),
        "tokens_per_second": round(tokens / elapsed, 1) if elapsed > 0 else None,
        "resumed_shards": len(jobs) - len(todo),
        "engine": sorted({s.engine for s in shards}),
        "dtype": dtype.__name__,
        "tokenizer": {
            "path": info.path,
            "sha256": info.sha256,
            "vocab_size": info.vocab_size,
            "eod_id": info.eod_id,
            "eod_token": info.eod_token,
        },
        "shards": [asdict(s) for s in shards],
    }
    with OutputSet() as out:
        for suffix in (".idx", ".bin"):
            out.stage(prefix + suffix, staging + suffix)
        write_json(out.stage(prefix + ".stats.json"), result)
    if not config.keep_shards:
        shutil.rmtree(shard_dir)
    return result
