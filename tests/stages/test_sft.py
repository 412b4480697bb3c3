"""SFT stage: packed == unpacked loss, a loss-mask gradient probe, the thinking blend, exact resume,
and the tiny recipe learning the demo's templated task (greedy exact match on held-out prompts)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from joyai_megatron.config.recipe import load_recipe
from joyai_megatron.stages.sft import SFTStage, collate_packed_rows
from tests.joyai_helpers import SFT_RECIPE
from tests.stages.stage_helpers import Run, run_stage, sft_overrides


def sft_dataset(demo_data: Path, seq_length: int = 512):
    from data_prep.sft import PackedSFTDataset

    return PackedSFTDataset(str(demo_data / "sft" / "train.parquet"), pad_to=seq_length)


def rows_with(dataset, want: int, predicate) -> list[int]:
    return [i for i in range(len(dataset)) if predicate(dataset[i])][:want]


@pytest.fixture(scope="module")
def model(pretrain_run: Run):
    """The pretraining checkpoint's GPTModel (fp32, local backend, with its MTP block)."""
    from joyai_megatron.stages.sft_eval import load_checkpoint_model
    from joyai_megatron.training.distributed import shutdown

    model, _ = load_checkpoint_model(pretrain_run.checkpoint_dir)
    yield model
    shutdown()


def stage_loss(stage: SFTStage, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """What the trainer does with one micro-batch: forward_step, then its loss function."""
    output, loss_func = stage.forward_step(iter([batch]), model)
    total, count, _ = loss_func(output)
    return total, count


# --- data ------------------------------------------------------------------------------------------


def test_collate_offsets_each_rows_cu_seqlens() -> None:
    rows = [
        {"tokens": np.zeros(6), "labels": np.zeros(6), "loss_mask": np.zeros(6), "position_ids": np.zeros(6),
         "cu_seqlens": np.array([0, 2, 6])},
        {"tokens": np.zeros(6), "labels": np.zeros(6), "loss_mask": np.zeros(6), "position_ids": np.zeros(6),
         "cu_seqlens": np.array([0, 1, 4, 6])},
    ]  # fmt: skip
    assert collate_packed_rows(rows)["cu_seqlens"].tolist() == [0, 2, 6, 7, 10, 12]
    rows[1]["cu_seqlens"] = np.array([0, 5])
    with pytest.raises(ValueError, match="does not span the row"):
        collate_packed_rows(rows)


def turns(tokens: np.ndarray, tok) -> list[tuple[str, int, int]]:
    """``(role, start, end)`` of each ChatML turn: ``<|im_start|>`` .. its ``<|im_end|>``."""
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    found, k = [], 0
    while k < len(tokens):
        if tokens[k] == start:
            stop = k + 1
            while tokens[stop] != end:
                stop += 1
            role = tok.decode(tokens[k + 1 : stop].tolist()).split("\n", 1)[0]
            found.append((role, k, stop))
            k = stop
        k += 1
    return found


def test_system_user_and_tool_tokens_are_never_trained_labels(demo_data: Path) -> None:
    """Independent of data_prep's generation spans: walk the ChatML turns of packed rows.  No token
    of a system, user or tool turn (nor an assistant turn's header) is ever a trained label, and
    every assistant turn's closing ``<|im_end|>`` is."""
    from joyai_megatron.training.tokenizer import HFTokenizer

    tok = HFTokenizer(demo_data / "tokenizer")
    dataset = sft_dataset(demo_data)
    seen: dict[str, int] = {}
    for index in range(0, len(dataset), 20):
        item = dataset[index]
        trained_label = np.zeros(len(item["tokens"]), dtype=bool)  # token j is a trained label
        trained_label[1:] = item["loss_mask"][:-1] > 0
        for role, a, b in turns(item["tokens"], tok):
            seen[role] = seen.get(role, 0) + 1
            if role == "assistant":
                assert not trained_label[a : a + 3].any(), f"row {index}: assistant header trained"
                assert trained_label[b], f"row {index}: assistant <|im_end|> not trained"
            else:
                assert not trained_label[a : b + 2].any(), f"row {index}: a {role} token is trained"
    assert {"system", "user", "tool", "assistant"} <= set(seen), seen


def test_thinking_ratio_blends_two_files(demo_data: Path, tmp_path: Path) -> None:
    """sft.thinking_ratio draws that share of rows from sft.thinking_path, the rest from
    data.sft_path, at every prefix of the run; each file is reshuffled per epoch and every row is
    used once per epoch; the same recipe gives the same order."""
    from data_prep.sft import prepare_sft

    corpus = (demo_data / "corpus" / "sft" / "train.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in corpus]
    for name, keep in (("think", True), ("plain", False)):
        chosen = [r for r in records if r["enable_thinking"] is keep][:300]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chosen))
        prepare_sft([str(tmp_path / f"{name}.jsonl")], str(demo_data / "tokenizer"),
                    str(tmp_path / f"{name}.parquet"), 512)  # fmt: skip
    recipe = load_recipe(SFT_RECIPE, [
        f"data.sft_path={tmp_path / 'plain.parquet'}", f"sft.thinking_path={tmp_path / 'think.parquet'}",
        "sft.thinking_ratio=0.25", f"data.tokenizer={demo_data / 'tokenizer'}",
    ])  # fmt: skip
    train = SFTStage(recipe).build_datasets(train_samples=800, valid_samples=0)["train"]
    located = [train.locate(i) for i in range(800)]
    sources = np.array([s for s, _ in located])
    assert all(abs(sources[:n].mean() - 0.25) <= 1.0 / n for n in range(1, 801))
    for source in (0, 1):
        n = len(train.sources[source])
        rows = [r for s, r in located if s == source]
        assert len(rows) >= 2 * n
        assert sorted(rows[:n]) == sorted(rows[n : 2 * n]) == list(range(n))
        assert rows[:n] != rows[n : 2 * n], "each epoch has its own order"
    think = tokenizer_id(demo_data, "<think>")
    for i in range(60):  # a row of the thinking file holds only conversations that generate <think>
        item = train[i]
        cu = item["cu_seqlens"]
        for a, b in zip(cu[:-1], cu[1:], strict=True):
            if item["loss_mask"][a:b].sum() == 0:
                continue  # padding
            generated = item["tokens"][a + 1 : b][item["loss_mask"][a : b - 1] > 0]
            assert (think in generated) == (located[i][0] == 1), i
    again = SFTStage(recipe).build_datasets(train_samples=800, valid_samples=0)["train"]
    assert [again.locate(i) for i in range(800)] == located


def tokenizer_id(demo_data: Path, token: str) -> int:
    from joyai_megatron.training.tokenizer import HFTokenizer

    return HFTokenizer(demo_data / "tokenizer").token_to_id(token)


def test_recipe_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sft.thinking_ratio and sft.thinking_path"):
        SFTStage.check_recipe(load_recipe(SFT_RECIPE, ["sft.thinking_ratio=0.3"]))
    with pytest.raises(FileNotFoundError, match="data.sft_path"):
        SFTStage.check_recipe(load_recipe(SFT_RECIPE, [f"data.sft_path={tmp_path / 'missing.parquet'}"]))


# --- the model -------------------------------------------------------------------------------------


def test_packed_and_unpacked_losses_match(model, demo_data: Path) -> None:
    """Two packed rows (many conversations each) through the stage's THD forward give the loss of
    every conversation run alone as an ordinary causal sequence, within 1e-5."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    dataset = sft_dataset(demo_data)
    rows = [dataset[i] for i in rows_with(dataset, 2, lambda it: len(it["cu_seqlens"]) > 4)]
    stage = SFTStage(load_recipe(SFT_RECIPE, []))
    with torch.no_grad():
        total, count = stage_loss(stage, model, collate_packed_rows(rows))
        alone_sum, alone_count = 0.0, 0.0
        for row in rows:
            cu = row["cu_seqlens"]
            for a, b in zip(cu[:-1], cu[1:], strict=True):
                mask = torch.tensor(row["loss_mask"][a:b])[None]
                if mask.sum() == 0:
                    continue  # the padding segment
                per_token = model(
                    torch.tensor(row["tokens"][a:b])[None],
                    torch.arange(b - a)[None],
                    None,
                    labels=torch.tensor(row["labels"][a:b])[None],
                )
                alone_sum += float((per_token * mask).sum())
                alone_count += float(mask.sum())
    MTPLossLoggingHelper.clean_metrics_in_tracker()
    assert float(count) == alone_count
    assert abs(float(total) / float(count) - alone_sum / alone_count) <= 1e-5


def test_prompt_system_and_tool_tokens_get_no_gradient(model, demo_data: Path) -> None:
    """Loss-mask probe on a packed row of system, user, tool and assistant turns.

    1. d loss / d logits at position p is zero exactly where the label at p (token p+1) is not an
       assistant token: masked predictions contribute nothing.
    2. d loss / d input embeddings: a prompt token still gets gradient through attention from the
       assistant tokens after it, so zero is expected only where no later *trained* prediction can
       see the token: after the last trained label of its conversation (attention never crosses a
       conversation boundary, so the next conversation in the row must not reach it; MTP's
       next-token embedding path is included, and stays inside the conversation too).  Prompt
       tokens followed by an answer must get non-zero gradient, so the probe is not trivially zero.
    """
    dataset = sft_dataset(demo_data)
    tool_id = tokenizer_id(demo_data, "<tool_call>")
    index = rows_with(dataset, 1, lambda it: (it["tokens"] == tool_id).any() and len(it["cu_seqlens"]) > 5)[0]
    row = dataset[index]
    batch = collate_packed_rows([row])
    stage = SFTStage(load_recipe(SFT_RECIPE, []))

    captured: dict[str, list[torch.Tensor]] = {"embedding": [], "logits": []}

    def keep(name):
        def hook(_module, _inputs, output):
            tensor = output[0] if isinstance(output, tuple) else output
            tensor.retain_grad()
            captured[name].append(tensor)

        return hook

    handles = [model.embedding.register_forward_hook(keep("embedding")),
               model.output_layer.register_forward_hook(keep("logits"))]  # fmt: skip
    try:
        model.zero_grad()
        total, _ = stage_loss(stage, model, batch)
        total.backward()
    finally:
        for h in handles:
            h.remove()
    mask = torch.tensor(row["loss_mask"]) > 0
    # The main head is the output layer's last call (MTP's head runs first).
    logit_grad = captured["logits"][-1].grad[:, 0].abs().amax(-1)  # [t]
    assert (logit_grad[~mask] == 0).all()
    assert (logit_grad[mask] > 0).all()

    embed_grads = [g.grad[:, 0].abs().amax(-1) for g in captured["embedding"]]  # main, then MTP's
    main_grad, mtp_grad = (
        embed_grads[0],
        embed_grads[1] if len(embed_grads) > 1 else torch.zeros_like(embed_grads[0]),
    )
    # MTP position p embeds token p+1: shift it back onto the token's own position.
    token_grad = main_grad + torch.cat([torch.zeros(1), mtp_grad[:-1]])
    cu = row["cu_seqlens"]
    unreachable = torch.zeros_like(mask)
    reachable_prompt = torch.zeros_like(mask)
    for a, b in zip(cu[:-1], cu[1:], strict=True):
        trained = torch.nonzero(mask[a:b]).flatten()
        last = a + int(trained.max()) if len(trained) else a - 1
        unreachable[last + 1 : b] = True
        if len(trained):
            reachable_prompt[a : a + int(trained.min())] = True  # prompt before the first answer
    assert unreachable.any() and reachable_prompt.any()
    assert (token_grad[unreachable] == 0).all(), torch.nonzero(token_grad[unreachable])
    assert (token_grad[reachable_prompt] > 0).all()


# --- training runs ---------------------------------------------------------------------------------


def test_sft_learns_the_templated_task(sft_run: Run, demo_data: Path) -> None:
    """The tiny recipe, from the pretraining checkpoint: greedy exact match >= 90% on 100 held-out
    conversations of every kind (plain, thinking, multi-turn, tool)."""
    from joyai_megatron.stages.sft_eval import exact_match, load_checkpoint_model, read_records
    from joyai_megatron.training.distributed import shutdown

    records = read_records(demo_data / "corpus" / "sft" / "eval.jsonl", limit=100)
    try:
        model, _ = load_checkpoint_model(sft_run.checkpoint_dir)
        report = exact_match(model, str(demo_data / "tokenizer"), records)
    finally:
        shutdown()
    summary = {k: report[k] for k in ("exact_match", "groups", "seconds")}
    print("SFT demo:", json.dumps({"train_seconds": round(sft_run.seconds, 1), **summary}))
    assert report["exact_match"] >= 0.9, summary


def test_sft_resume_is_exact(pretrain_run: Run, demo_data: Path, tmp_path: Path) -> None:
    """4 steps straight == 2 steps + a resumed run to 4, bitwise (losses and grad norms)."""

    def run(name: str, iters: int) -> Run:
        return run_stage("sft", SFT_RECIPE, tmp_path / name, [
            *sft_overrides(demo_data, pretrain_run.checkpoint_dir), f"train.train_iters={iters}",
            "train.global_batch_size=2", "train.micro_batch_size=2", "scheduler.warmup_tokens=0",
            "scheduler.decay_tokens=4096",  # fixed, so the LR does not depend on train_iters
        ])  # fmt: skip

    straight = run("straight", 4)
    first = run("split", 2)
    resumed = run("split", 4)
    assert [h["step"] for h in resumed.history] == [3, 4]
    for key in ("loss", "lm_loss", "mtp_loss", "grad_norm"):
        assert [h[key] for h in first.history + resumed.history] == [h[key] for h in straight.history], key
