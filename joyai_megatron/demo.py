"""The whole pipeline at toy scale on CPU: ``python -m joyai_megatron.demo``.

Every step is the same command a user runs (data_prep, the four pretraining stages with an
interruption and resume, stage 4 with context parallelism on 2 processes, the merge of its last two
checkpoints, SFT, DPO, FiberPO RL, lm-eval and MTP acceptance of the pretrained/merged/SFT/RL models,
QAT, export to Hugging Face and its check), so the demo doubles as an end-to-end smoke of the entry
points.  Outputs go under ``runs/demo/``.  One-process steps run as forked children of this process,
which imported PyTorch and Megatron-Core once first: each would otherwise spend ~5 s importing them
again (about 1.5 minutes over the demo); the torchrun step starts its workers as usual.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import multiprocessing
import runpy
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from joyai_megatron.errors import debug_enabled
from joyai_megatron.known_warnings import silence_known_warnings

ROOT = Path("runs/demo")
PY = [sys.executable, "-m"]
SFT_EVAL = "runs/demo/sft/exact_match.jsonl"
MERGED = "runs/demo/pretrain/stage4_merged"
EVAL = "runs/demo/eval"
EVAL_MODELS = {
    "pretrained": "runs/demo/pretrain/stage4/checkpoints",
    "merged": MERGED,
    "sft": "runs/demo/sft/checkpoints",
    "rl": "runs/demo/rl/checkpoints",
}


@dataclass(frozen=True)
class Step:
    title: str
    argv: list[str]
    log_dir: str | None = None  # where the stage writes metrics.jsonl


def _stage(
    stage: str, recipe: str, *overrides: str, logs: str | None = None, title: str = "", nproc: int = 1
) -> Step:
    """A stage's command; ``nproc`` > 1 runs it under torchrun on this machine (gloo on CPU)."""
    launcher = [*PY, "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m"] if nproc > 1 else PY
    return Step(title or f"{stage}: {recipe}", [*launcher, "joyai_megatron", stage, recipe, *overrides], logs)


STEPS: list[Step] = [
    Step("data: tokenizer, corpus, pretraining/SFT/DPO/RL datasets", [*PY, "data_prep", "demo", "--output", "runs/demo/data"]),
    _stage(
        "pretrain", "recipes/pretrain/tiny_cpu/stage1.yaml", "train.train_iters=100",
        title="pretrain stage 1 (stopped at step 100 to show resume)",
    ),
    _stage(
        "pretrain", "recipes/pretrain/tiny_cpu/stage1.yaml", logs="runs/demo/pretrain/stage1/logs",
        title="pretrain stage 1 (resumes at step 101)",
    ),
    _stage("pretrain", "recipes/pretrain/tiny_cpu/stage2.yaml", logs="runs/demo/pretrain/stage2/logs"),
    _stage("pretrain", "recipes/pretrain/tiny_cpu/stage3.yaml", logs="runs/demo/pretrain/stage3/logs"),
    _stage(
        "pretrain", "recipes/pretrain/tiny_cpu/stage4.yaml", "checkpoint.save_interval=10",
        logs="runs/demo/pretrain/stage4/logs", nproc=2,
        title="pretrain stage 4 (long context, context parallelism: each sequence split over 2 processes)",
    ),
    Step(
        "merge stage 4's last two checkpoints (JoyAI simulates LR decay by merging checkpoints)",
        [
            *PY, "joyai_megatron", "merge", "--checkpoint", "runs/demo/pretrain/stage4/checkpoints/iter_0000010",
            "--checkpoint", "runs/demo/pretrain/stage4/checkpoints/iter_0000020", "--output", MERGED,
            "--overwrite", "--no-progress",
        ],
    ),
    _stage("sft", "recipes/sft/tiny_cpu.yaml", logs="runs/demo/sft/logs"),
    Step(
        "score the SFT model: greedy exact match on 100 held-out conversations",
        [
            *PY, "joyai_megatron.stages.sft_eval", "runs/demo/sft/checkpoints", "--data",
            "runs/demo/data/corpus/sft/eval.jsonl", "--limit", "100", "--output", SFT_EVAL,
        ],
    ),
    _stage("dpo", "recipes/dpo/tiny_cpu.yaml", logs="runs/demo/dpo/logs"),
    # 80 of the recipe's 160 steps: from the demo's SFT model a 120-step run evaluates 0.010 / 0.220
    # / 0.220 pass@1 (eval reward 0.208 / 0.376 / 0.376) at steps 40 / 80 / 120: the toy policy has
    # converged by step 80.
    _stage(
        "rl", "recipes/rl/tiny_cpu.yaml", "train.train_iters=80", logs="runs/demo/rl/logs",
        title="rl: recipes/rl/tiny_cpu.yaml (80 steps: the toy policy has converged by then)",
    ),
    *(
        Step(
            f"evaluate the {name} model: lm-eval on the local tasks, MTP draft acceptance",
            [
                *PY, "joyai_megatron", "eval", checkpoint, "--limit", "10", "--thinking", "--mtp-acceptance",
                "--mtp-max-new-tokens", "24", "--output", f"{EVAL}/{name}.json",
            ],
        )
        for name, checkpoint in EVAL_MODELS.items()
    ),
    Step(
        "the evaluated models side by side (table and chart)",
        [
            *PY, "joyai_megatron.evaluation.report", *(f"{n}={EVAL}/{n}.json" for n in EVAL_MODELS),
            "--output", f"{EVAL}/summary.md", "--chart", f"{EVAL}/scores.png",
        ],
    ),
    _stage("qat", "recipes/qat/tiny_cpu.yaml", logs="runs/demo/qat/logs"),
    Step(
        "export the RL policy to Hugging Face (DeepseekV3 layout, MTP at layer N)",
        [*PY, "joyai_megatron.convert", "to-hf", "--checkpoint", "runs/demo/rl/checkpoints", "--output", "runs/demo/hf"],
    ),
    Step(
        "verify the export against the checkpoint (coverage, shapes, logits)",
        [*PY, "joyai_megatron.convert", "verify", "--checkpoint", "runs/demo/rl/checkpoints", "--hf", "runs/demo/hf", "--logits"],
    ),
    Step(
        "export the QAT model as INT4 (compressed-tensors, what vLLM/SGLang load) and reload it in transformers",
        [
            *PY, "joyai_megatron.quant.export", "--checkpoint", "runs/demo/qat/checkpoints", "--output",
            "runs/demo/hf_int4", "--format", "compressed-tensors", "--dtype", "fp32", "--verify-logits",
        ],
    ),
]


# Imported before the first step and inherited by each forked one: no thread started, nothing run.
PRELOADED = ("torch", "megatron.core", "joyai_megatron.training.trainer")


def _run_module(module: str, args: list[str]) -> None:
    """``python -m module args`` in this (forked) process, exit handlers included."""
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        atexit._run_exitfuncs()


def run_step(argv: list[str]) -> int:
    """A step's exit code: ``python -m`` commands in a forked child, others (torchrun) as given."""
    if argv[:2] != PY or argv[2] == "torch.distributed.run":
        return subprocess.run(argv).returncode
    child = multiprocessing.get_context("fork").Process(target=_run_module, args=(argv[2], argv[3:]), daemon=False)
    child.start()
    child.join()
    return child.exitcode


def _metrics(log_dir: str) -> list[dict]:
    path = Path(log_dir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def summarize() -> list[str]:
    """First/last losses per stage and the pretraining checks the demo promises."""
    lines = []
    stage1 = _metrics("runs/demo/pretrain/stage1/logs")
    pretrain = [m for d in ("stage1", "stage2", "stage3", "stage4") for m in _metrics(f"runs/demo/pretrain/{d}/logs")]
    if pretrain:
        first, last = pretrain[0]["lm_loss"], pretrain[-1]["lm_loss"]
        lines.append(f"pretraining LM loss {first:.3f} -> {last:.3f} ({last / first:.0%} of the first logged value)")
    mtp = [m["mtp_loss"] for m in _metrics("runs/demo/pretrain/stage3/logs") if "mtp_loss" in m]
    if mtp:
        lines.append(f"stage 3 MTP loss {mtp[0]:.3f} -> {mtp[-1]:.3f}")
    resumed = [m["step"] for m in stage1]
    if resumed:
        lines.append(f"stage 1 logged steps {resumed[0]}..{resumed[-1]} across the interruption at 100")
    if Path(SFT_EVAL).exists():
        scored = [json.loads(x)["correct"] for x in Path(SFT_EVAL).read_text().splitlines() if x.strip()]
        lines.append(f"SFT exact match {sum(scored) / len(scored):.0%} on {len(scored)} held-out conversations")
    tracked = {
        "sft": ("loss",),
        "dpo": ("loss", "rewards/accuracies"),
        "rl": ("stage/reward", "stage/eval/reward", "stage/eval/pass@1"),
        "qat": ("lm_loss",),
    }
    for name, keys in tracked.items():
        rows = _metrics(f"runs/demo/{name}/logs")
        found = []
        for key in keys:
            values = [m[key] for m in rows if key in m]
            if values:
                found.append(f"{key} {values[0]:.3f} -> {values[-1]:.3f}")
        if found:
            lines.append(f"{name}: " + ", ".join(found))
    table = Path(EVAL) / "summary.md"
    if table.exists():
        lines.append(f"eval (10 documents per task, thinking mode; chart: {EVAL}/scores.png):")
        lines += ["  " + row for row in table.read_text().splitlines()]
    compare = Path("runs/demo/qat/logs/qat_compare.json")
    if compare.exists():
        c = json.loads(compare.read_text())
        lines.append(
            f"qat: validation loss unquantized {c['unquantized']:.4f}, INT4 PTQ {c['ptq']:.4f}, INT4 QAT {c['qat']:.4f}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep runs/demo (default: start fresh)")
    args = parser.parse_args(argv)
    if ROOT.exists() and not args.keep:
        shutil.rmtree(ROOT)
    started = time.time()
    if not debug_enabled(sys.argv[1:] if argv is None else argv):
        silence_known_warnings()  # the preloads' import-time warnings, inherited by every step
    for module in PRELOADED:
        importlib.import_module(module)
    for i, step in enumerate(STEPS, 1):
        shown = " ".join(step.argv[2:]).replace("torch.distributed.run ", "torchrun ")
        print(f"\n=== [{i}/{len(STEPS)}] {step.title}\n$ {shown}", flush=True)
        t0 = time.time()
        code = run_step(step.argv)
        if code != 0:
            print(f"demo: step {i} failed with exit code {code}", file=sys.stderr)
            return code
        print(f"--- done in {time.time() - started:.0f}s total ({time.time() - t0:.0f}s for this step)", flush=True)
    print("\n=== Summary")
    for line in summarize():
        print("  " + line)
    print(
        "  outputs: runs/demo/data (tokenizer, datasets), runs/demo/pretrain/stage{1..4}, runs/demo/{sft,dpo,rl,qat}"
        " (each: checkpoints/ + logs/ with metrics.jsonl and TensorBoard), runs/demo/hf (Hugging Face export),"
        " runs/demo/eval (eval results per model, summary.md, scores.png),"
        " runs/demo/hf_int4 (INT4 export of the QAT model; fp32 here for the exact reload check, bf16 by default)"
    )
    print(f"  total time {time.time() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
