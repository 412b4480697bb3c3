"""``python -m data_prep <subcommand>``: argument parsing and error reporting only."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from data_prep.errors import DEFAULT_SKIP_FRACTION, DataPrepError, OutputLimits
from joyai_megatron.errors import cli_entry


def _common(parser: argparse.ArgumentParser, needs_seq: bool = False) -> None:
    parser.add_argument(
        "--input", nargs="+", required=True, help="files or globs (JSONL, .gz, .zst, Parquet)"
    )
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json or a directory holding one")
    parser.add_argument("--on-error", choices=("fail", "skip"), default="fail")
    parser.add_argument(
        "--max-skip-fraction",
        type=float,
        default=DEFAULT_SKIP_FRACTION,
        help="with --on-error skip: fail when more of the records are dropped (default %(default)s)",
    )
    parser.add_argument("--allow-empty", action="store_true", help="write an empty output instead of failing")
    parser.add_argument("--engine", choices=("auto", "gigatoken", "hf"), default="auto")
    if needs_seq:
        parser.add_argument("--seq-length", type=int, default=4096)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="documents -> Megatron IndexedDataset (.bin/.idx)")
    _common(p)
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--text-key", default="text")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--max-doc-bytes", type=int, default=64 << 20)
    p.add_argument("--eod-token", help="default: tokenizer_config.json's eos_token, else <|end_of_text|>")
    p.add_argument(
        "--verify-bytes",
        type=int,
        default=16 << 10,
        help="text per shard re-encoded with HF tokenizers to check the fast engine (0: off)",
    )
    p.add_argument("--keep-shards", action="store_true", help="keep PREFIX.shards/ after merging")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("train-tokenizer", help="train the small byte-level BPE demo tokenizer")
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--output", required=True, help="directory for tokenizer.json + tokenizer_config.json")
    p.add_argument("--vocab-size", type=int, default=8192)

    p = sub.add_parser("make-corpus", help="write the CPython-docs corpus and synthetic SFT/DPO/RL sets")
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=1234)

    p = sub.add_parser("sft", help="chat messages -> packed Parquet with assistant masks")
    _common(p, needs_seq=True)
    p.add_argument("--output", required=True, help="output .parquet")

    p = sub.add_parser("dpo", help="preference pairs -> tokenized Parquet")
    _common(p, needs_seq=True)
    p.add_argument("--output", required=True, help="output .parquet")

    p = sub.add_parser("rl", help="prompts + answers -> rendered, tokenized JSONL")
    _common(p)
    p.add_argument("--output", required=True, help="output .jsonl")
    p.add_argument("--default-verifier", help="for records without 'verifier'")
    p.add_argument("--default-domain", help="for records without 'domain'")
    p.add_argument("--no-thinking", action="store_true", help="render prompts in non-thinking mode")

    p = sub.add_parser("blend", help="validate a blend YAML and print Megatron's --data-path")
    p.add_argument("path")

    p = sub.add_parser("agentic-demo", help="the toy calculator tool-use task: SFT warm start + RL prompts")
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--sft-examples", type=int, default=200)
    p.add_argument(
        "--explicit-examples", type=int, default=600, help="demos of prompts that ask for the tool"
    )
    p.add_argument("--tool-share", type=float, default=0.4, help="share of SFT demos that call the tool")
    p.add_argument("--rl-prompts", type=int, default=200)
    p.add_argument("--eval-prompts", type=int, default=64)

    p = sub.add_parser("demo", help="build every demo artifact under one directory")
    p.add_argument("--output", required=True)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--workers", type=int, default=1)
    return parser


def _limits(args: argparse.Namespace) -> OutputLimits:
    return OutputLimits(allow_empty=args.allow_empty, max_skip_fraction=args.max_skip_fraction)


def _config_from(args: argparse.Namespace, config: type, **given: object) -> object:
    """The dataclass ``config`` from the ``given`` fields plus, for every other field, the parsed
    option of the same name (the flags are its field names, so none is restated)."""
    names = {f.name for f in dataclasses.fields(config)} - given.keys()
    missing = sorted(n for n in names if not hasattr(args, n))
    if missing:
        raise TypeError(f"{config.__name__} fields without a command-line option: {missing}")
    return config(**{n: getattr(args, n) for n in names}, **given)


def run(args: argparse.Namespace) -> object:
    """Dispatch one parsed command; returns what to print as JSON."""
    if args.command == "pretrain":
        from data_prep.pretrain import PretrainConfig, run_pretrain

        return run_pretrain(
            _config_from(
                args, PretrainConfig, inputs=args.input, progress=not args.no_progress, limits=_limits(args)
            )
        )
    if args.command == "train-tokenizer":
        from data_prep.train_tokenizer import train_tokenizer

        return {"tokenizer": str(train_tokenizer(args.input, args.output, args.vocab_size))}
    if args.command == "agentic-demo":
        from data_prep.agentic_demo import build_agentic_demo

        return build_agentic_demo(
            Path(args.output),
            seed=args.seed,
            sft_examples=args.sft_examples,
            explicit_examples=args.explicit_examples,
            tool_share=args.tool_share,
            rl_prompts=args.rl_prompts,
            eval_prompts=args.eval_prompts,
        )
    if args.command == "make-corpus":
        from data_prep.demo import make_corpus

        return {"files": [str(p) for p in make_corpus(Path(args.output), args.seed)]}
    if args.command in ("sft", "dpo"):
        from data_prep.chat_prep import PrepOptions
        from data_prep.dpo import prepare_dpo
        from data_prep.sft import prepare_sft

        prepare = prepare_sft if args.command == "sft" else prepare_dpo
        options = PrepOptions(args.on_error, args.engine, _limits(args))
        return prepare(args.input, args.tokenizer, args.output, args.seq_length, options)
    if args.command == "rl":
        from data_prep.rl import prepare_rl

        return prepare_rl(
            args.input,
            args.tokenizer,
            args.output,
            args.default_verifier,
            args.default_domain,
            not args.no_thinking,
            args.on_error,
            args.engine,
            _limits(args),
        )
    if args.command == "blend":
        from data_prep.blend import data_path_args, load_blend

        prefixes, weights = load_blend(args.path)
        return {"blend": [prefixes, weights], "data_path": data_path_args(prefixes, weights)}
    from data_prep.demo import build_demo

    return build_demo(Path(args.output), args.seq_length, args.workers)


@cli_entry
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except FileNotFoundError as err:
        _note_earlier_outputs(args)
        raise DataPrepError("file not found", err.filename, err.strerror, "check the path") from err
    except BaseException:
        _note_earlier_outputs(args)
        raise
    _report(result)
    print(json.dumps(result, indent=2, default=str))
    return 0


def _note_earlier_outputs(args: argparse.Namespace) -> None:
    """A failed run publishes nothing; files already at its output paths are an earlier run's."""
    if getattr(args, "output_prefix", None):
        paths = [f"{args.output_prefix}{s}" for s in (".bin", ".idx", ".stats.json")]
    elif args.command in ("sft", "dpo", "rl"):
        paths = [args.output, f"{args.output}.stats.json"]
    else:
        return
    old = [p for p in paths if os.path.exists(p)]
    if old:
        print(f"note: this run published nothing; {', '.join(old)} are from an earlier run", file=sys.stderr)


def _report(result: object) -> None:
    """Skips and warnings on stderr too: the JSON on stdout is easy to pipe away unread."""
    if not isinstance(result, dict):
        return
    for kind in ("skipped", "warnings"):
        counts = result.get(kind) or {}
        if counts:
            listed = ", ".join(f"{name}: {n}" for name, n in sorted(counts.items()))
            print(f"{'warning' if kind == 'warnings' else 'skipped'}: {listed}", file=sys.stderr)
