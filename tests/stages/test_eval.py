"""``eval``: lm-eval's scores of our Megatron model equal a hand computation; the CLI writes its results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.stages.stage_helpers import Run


@pytest.fixture(scope="module")
def scored(pretrain_run: Run, demo_data: Path):
    """lm-eval on the first 5 documents of the shipped multiple-choice task, samples logged."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from joyai_megatron.evaluation.lm import MegatronLM
    from joyai_megatron.evaluation.tasks.utils import TASK_DIR
    from joyai_megatron.stages.sft_eval import load_checkpoint_model
    from joyai_megatron.training.distributed import shutdown

    model, _ = load_checkpoint_model(pretrain_run.checkpoint_dir)
    tokenizer = AutoTokenizer.from_pretrained(demo_data / "tokenizer")
    lm = MegatronLM(model, tokenizer, max_length=128)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=["joyai_demo_choice"],
        limit=5,
        task_manager=TaskManager(include_path=str(TASK_DIR)),
        bootstrap_iters=0,
    )
    yield model, tokenizer, results
    shutdown()


def test_lm_eval_matches_a_hand_computation(scored) -> None:
    """Each choice's log-likelihood by a plain full forward (convert's reference path), then acc and
    acc_norm (log-likelihood per character) by hand, against lm-eval's samples and aggregates."""
    from joyai_megatron.convert.megatron_model import megatron_logits

    model, tokenizer, results = scored
    docs = [
        json.loads(x)
        for x in (Path(__file__).parents[2] / "joyai_megatron/evaluation/tasks/joyai_demo_choice.jsonl")
        .read_text()
        .splitlines()[:5]
    ]
    samples = results["samples"]["joyai_demo_choice"]
    assert [s["doc"]["question"] for s in samples] == [d["question"] for d in docs]
    acc, acc_norm = [], []
    for doc, sample in zip(docs, samples, strict=True):
        # lm-eval's split: the continuation ("\n" target delimiter + choice) is the whole text's tokens
        # after as many as the context alone has, appended to the context's own tokens
        context = doc["question"]
        context_ids = tokenizer.encode(context, add_special_tokens=False)
        lls = []
        for choice in doc["choices"]:
            whole = tokenizer.encode(context + "\n" + choice, add_special_tokens=False)
            ids = context_ids + whole[len(context_ids) :]
            logits, _ = megatron_logits(model, torch.tensor([ids]))
            logp = logits[0].float().log_softmax(-1)
            lls.append(sum(float(logp[t - 1, ids[t]]) for t in range(len(context_ids), len(ids))))
        lm_eval_lls = [float(r[0][0]) for r in sample["resps"]]
        assert lm_eval_lls == pytest.approx(lls, abs=1e-4)
        acc.append(float(max(range(4), key=lambda i: lls[i]) == doc["gold"]))
        per_char = [ll / len(c) for ll, c in zip(lls, doc["choices"], strict=True)]
        acc_norm.append(float(max(range(4), key=lambda i: per_char[i]) == doc["gold"]))
    table = results["results"]["joyai_demo_choice"]
    assert table["acc,none"] == pytest.approx(sum(acc) / 5)
    assert table["acc_norm,none"] == pytest.approx(sum(acc_norm) / 5)


def test_eval_cli_writes_results_and_scalars(
    pretrain_run: Run, demo_data: Path, tmp_path: Path, shutdown
) -> None:
    from joyai_megatron.cli import main

    out = tmp_path / "results.json"
    argv = [
        "eval", str(pretrain_run.checkpoint_dir), "--limit", "2", "--tokenizer", str(demo_data / "tokenizer"),
        "--no-chat-template", "--mtp-acceptance", "--draft-tokens", "2", "--mtp-max-new-tokens", "8", "--output", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert set(doc["tasks"]) == {"joyai_demo_choice", "joyai_demo_math", "joyai_demo_heldout"}
    assert 0 <= doc["tasks"]["joyai_demo_choice"]["acc"] <= 1
    assert doc["tasks"]["joyai_demo_heldout"]["byte_perplexity"] > 1
    assert doc["mtp_acceptance"]["acceptance_length"] >= 1
    assert doc["mode"] == {"chat_template": False, "thinking": False}
    logged = [
        json.loads(x) for x in (pretrain_run.log_dir / "eval" / "metrics.jsonl").read_text().splitlines()
    ]
    assert "eval/joyai_demo_choice/acc" in logged[-1] and "eval/mtp/acceptance_length" in logged[-1]
