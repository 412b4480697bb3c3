"""Conversion throughput and peak memory on a synthetic JoyAI-shaped checkpoint.

Full width (hidden 2048, 256 experts of 768, MLA ranks, vocab 129,280, dense MTP) with few layers,
bf16.  Each phase runs in its own process; its peak memory is sampled anonymous RSS (the safetensors
files it mmaps are page cache, not memory the converter holds) and its CPU time comes from
``os.wait4``:

* ``from-hf``   ours: HF safetensors -> Megatron ``torch_dist`` (streaming, threaded DCP writer)
* ``to-hf``     ours: ``torch_dist`` -> HF safetensors (streaming, threaded shard writers)
* ``merge``     ours: the 0.5/0.5 average of two ``torch_dist`` checkpoints (the import, read twice)
* ``baseline``  the naive import: load every HF tensor, build the whole Megatron state dict in
                memory, ``torch.distributed.checkpoint.save`` it (what a converter that holds
                the model does); same output keys, checked equal to ours on a sample.

Reads mostly come from the page cache (the files were just written); writes are fsynced, so wall
GB/s is bounded by the disk and by other load on the machine, while GB per CPU-second measures the
converter itself.  GB = 1e9 bytes.

Usage: ``python benchmarks/convert.py [--layers 2] [--threads N] [--work DIR] [--keep]``
(``--work /dev/shm/x`` takes the disk out of the measurement where RAM allows.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# This file is named like the package it measures: import the package, not this script.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from joyai_megatron.convert.hf_config import arch_to_hf_config  # noqa: E402
from joyai_megatron.convert.mapping import mapping_table  # noqa: E402
from joyai_megatron.model.presets import JOYAI_48B_A3B  # noqa: E402


def make_synthetic(path: Path, layers: int, shard_bytes: int = 2 * 10**9) -> int:
    """A JoyAI-shaped HF checkpoint (bf16; router bias fp32, MTP copies included); returns its bytes."""
    arch = JOYAI_48B_A3B.replace(num_layers=layers)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(arch_to_hf_config(arch), indent=2))
    pool = torch.randn(64 * 2**20, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    total = offset = 0

    def flush() -> None:
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard.clear()

    for row in mapping_table(arch).rows:
        for name, shape in zip(row.hf, row.hf_shapes, strict=True):
            n = math.prod(shape)
            offset = (offset + 4099) % (pool.numel() - min(n, pool.numel()) + 1)
            data = pool.repeat(n // pool.numel() + 1)[:n] if n > pool.numel() else pool[offset : offset + n]
            t = data.reshape(shape).clone()
            if name.endswith("e_score_correction_bias"):
                t = t.float()
            shard[name] = t
            shard.update({c: t.clone() for c in row.copies})  # vLLM's MTP embed/head copies
            total += sum(x.numel() * x.element_size() for x in [t, *(t for _ in row.copies)])
            if sum(x.numel() * x.element_size() for x in shard.values()) >= shard_bytes:
                flush()
    flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return total


def phase(kind: str, work: Path, threads: int) -> dict:
    """Run inside the child process; returns {'seconds', 'bytes'}."""
    start = time.perf_counter()
    if kind == "from-hf":
        from joyai_megatron.convert.from_hf import import_from_hf

        r = import_from_hf(work / "hf", work / "megatron", threads=threads, progress=False)
        return {"seconds": time.perf_counter() - start, "bytes": r.bytes}
    if kind == "to-hf":
        from joyai_megatron.convert.to_hf import export_to_hf

        # 1 GB shards so that the parallel shard writers have work at this small size.
        r = export_to_hf(
            work / "megatron", work / "export", threads=threads, max_shard_bytes=10**9, progress=False
        )
        return {"seconds": time.perf_counter() - start, "bytes": r.bytes}
    if kind == "merge":
        from joyai_megatron.convert.merge import merge_checkpoints

        src = work / "megatron"
        r = merge_checkpoints([(src, 0.5), (src, 0.5)], work / "merged", threads=threads, progress=False)
        return {"seconds": time.perf_counter() - start, "bytes": r.bytes}
    return naive_import(work, threads, start)


def naive_import(work: Path, threads: int, start: float) -> dict:
    """Whole-model import: every HF tensor in memory, Megatron state dict built, one DCP save."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    from joyai_megatron.convert.dist_ckpt import ckpt_location
    from joyai_megatron.convert.hf_config import arch_from_hf_config, load_hf_config
    from joyai_megatron.convert.mapping import hf_to_megatron

    arch = arch_from_hf_config(load_hf_config(work / "hf"))
    hf: dict[str, torch.Tensor] = {}
    for file in sorted((work / "hf").glob("*.safetensors")):
        hf.update(load_file(file))
    state: dict[str, torch.Tensor] = {}
    experts: dict[str, list[torch.Tensor]] = {}
    for row in mapping_table(arch).rows:
        tensor = hf_to_megatron(row.megatron, hf, arch)
        key, expert = ckpt_location(row.megatron)
        if expert is None:
            state[key] = tensor
        else:
            experts.setdefault(key, []).append(tensor)
    state.update({k: torch.stack(v) for k, v in experts.items()})
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    writer = dcp.FileSystemWriter(work / "baseline", thread_count=threads)
    dcp.save(state, storage_writer=writer, no_dist=True)
    return {"seconds": time.perf_counter() - start, "bytes": nbytes}


def _rss_anon(pid: int) -> int:
    """Anonymous resident bytes: the process's own memory, not mmapped file pages it touched."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_child(kind: str, work: Path, threads: int) -> dict:
    """Run one phase in its own process: its result plus peak anonymous RSS and CPU seconds."""
    cmd = [sys.executable, __file__, "--phase", kind, "--work", str(work), "--threads", str(threads)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon(proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    if status != 0:
        raise SystemExit(f"{kind} failed (status {status})")
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "peak_anon": peak[0], "cpu": usage.ru_utime + usage.ru_stime}


def check_same(work: Path, samples: int = 12) -> None:
    """The naive import and ours store the same tensors (a spread of keys, experts included)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    from joyai_megatron.convert.dist_ckpt import DistCkptReader

    ours = DistCkptReader(work / "megatron")
    base = FileSystemReader(work / "baseline").read_metadata().state_dict_metadata
    keys = [k for k in ours.model_keys() if not k.endswith("layer_norm_weight")]  # TE aliases: ours only
    missing = sorted(set(keys) - set(base))
    if missing:
        raise SystemExit(f"the naive import lacks {missing[:3]}")
    for key in keys[:: max(1, len(keys) // samples)]:
        want = {key: torch.empty(base[key].size, dtype=base[key].properties.dtype)}
        dcp.load(want, storage_reader=FileSystemReader(work / "baseline"), no_dist=True)
        if not torch.equal(want[key], ours.read(key)):
            raise SystemExit(f"{key} differs between the naive and the streaming import")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2, help="decoder layers (layer 0 dense, rest MoE) + 1 MTP")
    p.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--phase", choices=["from-hf", "to-hf", "merge", "baseline"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, args.work, args.threads)))
        return

    if args.work is not None and args.work.exists():
        raise SystemExit(f"--work {args.work} exists; give a new directory (it is deleted afterwards)")
    work = args.work or Path(tempfile.mkdtemp(prefix="convert-bench-"))
    try:
        t = time.perf_counter()
        total = make_synthetic(work / "hf", args.layers)
        print(
            f"synthetic JoyAI-shaped checkpoint: {args.layers} layers + MTP, 256 experts, "
            f"{total / 1e9:.2f} GB bf16 ({time.perf_counter() - t:.0f} s to make); threads={args.threads}"
        )
        results = {
            kind: run_child(kind, work, args.threads) for kind in ("from-hf", "to-hf", "merge", "baseline")
        }
        check_same(work)
        print(
            f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (wall GB/s suffers under load)"
        )
        print(
            f"{'phase':<10} {'GB':>6} {'wall s':>7} {'GB/s':>6} {'CPU s':>6} {'GB/CPU-s':>9} {'peak anon RSS GB':>17}"
        )
        for kind, r in results.items():
            gb = r["bytes"] / 1e9
            print(
                f"{kind:<10} {gb:6.2f} {r['seconds']:7.1f} {gb / r['seconds']:6.2f} {r['cpu']:6.1f} "
                f"{gb / r['cpu']:9.2f} {r['peak_anon'] / 1e9:17.2f}"
            )
        ours, base = results["from-hf"], results["baseline"]
        print(
            f"from-hf vs the naive whole-model import: {base['cpu'] / ours['cpu']:.2f}x less CPU time, "
            f"{ours['peak_anon'] / base['peak_anon']:.2f}x the peak memory "
            f"({ours['peak_anon'] / 1e9:.2f} GB vs {base['peak_anon'] / 1e9:.2f} GB for a {total / 1e9:.2f} GB checkpoint)"
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
