"""``python -m joyai_megatron.convert {to-hf,from-hf,verify} ...`` (see docs/conversion.md)."""

from __future__ import annotations

import argparse
import sys

from joyai_megatron.errors import cli_entry


def _size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40, "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m joyai_megatron.convert", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("to-hf", help="Megatron torch_dist checkpoint -> HF DeepseekV3 safetensors")
    t.add_argument(
        "--checkpoint", required=True, help="<ckpt_dir> (newest complete step) or <ckpt_dir>/iter_*"
    )
    t.add_argument("--output", required=True)
    t.add_argument("--model-type", default="deepseek_v3", choices=["deepseek_v3", "joyai_llm_flash"])
    t.add_argument(
        "--no-mtp", action="store_true", help="leave the MTP block out (num_nextn_predict_layers=0)"
    )
    t.add_argument("--dtype", default="keep", help="keep (stored dtype) | bf16 | fp16 | fp32")
    t.add_argument("--max-shard-size", type=_size, default=_size("5GB"), help="e.g. 5GB (default)")

    f = sub.add_parser("from-hf", help="HF DeepseekV3 / JoyAI-LLM-Flash -> Megatron torch_dist checkpoint")
    f.add_argument("--hf", required=True, help="directory with config.json and *.safetensors")
    f.add_argument("--output", required=True)
    f.add_argument("--no-mtp", action="store_true", help="import without the MTP block")
    f.add_argument("--dtype", default="keep", help="keep (HF dtype) | bf16 | fp16 | fp32")
    f.add_argument(
        "--names",
        default="te",
        choices=["te", "local", "both"],
        help="norm spellings to store: TE's fused names (default: what both backends save and load), "
        "the separate-module names of checkpoints from before the backends shared them, or both",
    )

    v = sub.add_parser(
        "verify",
        help="check files against their checksums.json and, with --hf, that a Megatron checkpoint and an "
        "HF directory hold the same model",
    )
    v.add_argument("--checkpoint", required=True)
    v.add_argument("--hf", help="the HF export to compare with (default: only the checksum check)")
    v.add_argument("--no-mtp", action="store_true")
    v.add_argument("--dtype", default="keep", help="the --dtype the export was made with")
    v.add_argument("--logits", action="store_true", help="also compare logits and greedy decoding on CPU")
    v.add_argument("--tolerance", type=float, default=1e-4, help="max abs logit difference (fp32)")

    for s in (t, f):
        s.add_argument("--threads", type=int, default=4, help="parallel shard writers")
        s.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    for s in (t, f, v):
        s.add_argument("--no-progress", action="store_true")
    return p


@cli_entry
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    progress = not args.no_progress
    if args.command == "to-hf":
        from joyai_megatron.convert.to_hf import export_to_hf

        r = export_to_hf(
            args.checkpoint,
            args.output,
            model_type=args.model_type,
            include_mtp=not args.no_mtp,
            dtype=args.dtype,
            max_shard_bytes=args.max_shard_size,
            threads=args.threads,
            overwrite=args.overwrite,
            progress=progress,
        )
        print(
            f"to-hf: {r.tensors} tensors, {r.bytes / 2**30:.3f} GiB in {r.shards} shards -> {r.output} "
            f"({r.seconds:.1f} s, {r.bytes / 2**30 / max(r.seconds, 1e-9):.2f} GiB/s)"
        )
    elif args.command == "from-hf":
        from joyai_megatron.convert.from_hf import import_from_hf

        r = import_from_hf(
            args.hf,
            args.output,
            dtype=args.dtype,
            names=args.names,
            include_mtp=not args.no_mtp,
            threads=args.threads,
            overwrite=args.overwrite,
            progress=progress,
        )
        print(
            f"from-hf: {r.chunks} chunks, {r.bytes / 2**30:.3f} GiB -> {r.iteration_dir} ({r.seconds:.1f} s)"
        )
    else:
        from joyai_megatron.convert.verify import verify

        r = verify(
            args.checkpoint,
            args.hf,
            include_mtp=not args.no_mtp,
            dtype=args.dtype,
            logits=args.logits,
            logits_tolerance=args.tolerance,
            progress=progress,
        )
        if args.hf is None:
            print("verify: OK, every file matches checksums.json" if not r.notes else "verify: nothing checked")
        else:
            print(
                f"verify: OK, {r.tensors} tensors ({r.bytes / 2**30:.3f} GiB) written exactly once and equal"
            )
        if r.max_logit_diff is not None:
            print(
                f"verify: max |logit diff| {r.max_logit_diff:.3g}, greedy generations "
                f"{'identical' if r.greedy_match else 'differ'}"
            )
        for note in r.notes:
            print(f"verify: note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
