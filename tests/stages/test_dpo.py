"""DPO stage: TRL-equal loss and metrics, pair packing, the MTP-free log-prob path, precomputed vs
live reference, exact resume, and learning on the demo's preference set."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from joyai_megatron.config.recipe import load_recipe
from joyai_megatron.stages.dpo import CHOSEN, PADDING, REJECTED, DPOStage, PairRows
from joyai_megatron.training.checkpoint import resolve_checkpoint
from tests.joyai_helpers import DPO_RECIPE
from tests.stages.stage_helpers import Run, dpo_overrides, run_stage

# --- the loss against TRL's formulas ---------------------------------------------------------------


def trl_reference(pc, pr, rc, rr, lc, lr, beta, loss_type, label_smoothing=0.0):
    """TRL ``DPOTrainer`` (main branch, 2026) written out per pair in plain Python floats:
    ``sigmoid`` (with TRL's older ``label_smoothing`` = conservative DPO) and length-normalised
    ``ipo``; rewards are ``beta * (logp - ref_logp)`` of the summed log-probs."""
    losses, rewards_c, rewards_r = [], [], []
    for k in range(len(pc)):
        chosen_ratio, rejected_ratio = pc[k] - rc[k], pr[k] - rr[k]
        if loss_type == "sigmoid":
            z = beta * (chosen_ratio - rejected_ratio)
            log_sig = -math.log1p(math.exp(-z))
            log_sig_neg = -math.log1p(math.exp(z))
            losses.append(-(1 - label_smoothing) * log_sig - label_smoothing * log_sig_neg)
        else:
            delta = chosen_ratio / max(lc[k], 1) - rejected_ratio / max(lr[k], 1)
            losses.append((delta - 1 / (2 * beta)) ** 2)
        rewards_c.append(beta * chosen_ratio)
        rewards_r.append(beta * rejected_ratio)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        "loss": mean(losses),
        "rewards/chosen": mean(rewards_c),
        "rewards/rejected": mean(rewards_r),
        "rewards/accuracies": mean([float(c > r) for c, r in zip(rewards_c, rewards_r, strict=True)]),
        "rewards/margins": mean([c - r for c, r in zip(rewards_c, rewards_r, strict=True)]),
        "logps/chosen": mean(pc),
        "logps/rejected": mean(pr),
    }


def synthetic_batch(rows: int, length: int, seed: int):
    """Random per-token -log p and pair rows [chosen | rejected | padding] with random masks."""
    rng = np.random.default_rng(seed)
    segment = np.full((rows, length), PADDING)
    mask = np.zeros((rows, length), dtype=np.float32)
    for r in range(rows):
        lc, lr = rng.integers(3, length // 2, size=2)
        segment[r, :lc], segment[r, lc : lc + lr] = CHOSEN, REJECTED
        mask[r, : lc + lr] = rng.random(lc + lr) < 0.6  # prompt tokens are masked
        mask[r, lc - 1] = mask[r, lc + lr - 1] = 0  # a segment's last token predicts nothing
        mask[r, 1] = mask[r, lc + 1] = 1  # at least one response token per side
    nll = torch.tensor(rng.exponential(2.0, size=(1, rows * length)), dtype=torch.float32)
    ref = torch.tensor(rng.normal(-20, 4, size=(rows, 2)), dtype=torch.float32)
    return nll, {"loss_mask": torch.tensor(mask), "segment": torch.tensor(segment), "ref_logps": ref}


def per_pair_sums(nll: torch.Tensor, batch: dict) -> tuple[list[float], list[float], list[int], list[int]]:
    """Independent loop: summed log p and response-token counts of each side of each row."""
    rows, length = batch["segment"].shape
    flat = (-nll).reshape(rows, length).double().tolist()
    pc, pr, lc, lr = [], [], [], []
    for r in range(rows):
        sums, counts = {CHOSEN: 0.0, REJECTED: 0.0}, {CHOSEN: 0, REJECTED: 0}
        for t in range(length):
            seg = int(batch["segment"][r, t])
            if seg in sums and batch["loss_mask"][r, t] > 0:
                sums[seg] += flat[r][t]
                counts[seg] += 1
        pc.append(sums[CHOSEN])
        pr.append(sums[REJECTED])
        lc.append(counts[CHOSEN])
        lr.append(counts[REJECTED])
    return pc, pr, lc, lr


@pytest.mark.parametrize(
    ("loss_type", "beta", "label_smoothing"),
    [("sigmoid", 0.1, 0.0), ("sigmoid", 0.3, 0.2), ("ipo", 0.1, 0.0), ("ipo", 0.5, 0.0)],
)
def test_loss_and_metrics_match_trl(loss_type: str, beta: float, label_smoothing: float) -> None:
    recipe = load_recipe(
        DPO_RECIPE,
        [f"dpo.loss_type={loss_type}", f"dpo.beta={beta}", f"dpo.label_smoothing={label_smoothing}"],
    )
    stage = DPOStage(recipe)
    nll, batch = synthetic_batch(rows=5, length=40, seed=7)
    total, count, metrics = stage._loss(batch, nll)
    pc, pr, lc, lr = per_pair_sums(nll, batch)
    rc, rr = batch["ref_logps"][:, 0].double().tolist(), batch["ref_logps"][:, 1].double().tolist()
    expected = trl_reference(pc, pr, rc, rr, lc, lr, beta, loss_type, label_smoothing)
    assert int(count) == 5
    assert float(total) / 5 == pytest.approx(expected["loss"], rel=1e-5, abs=1e-6)
    for name, value in expected.items():
        got = metrics[name]
        assert float(got[1]) == 5, name
        assert float(got[0] / got[1]) == pytest.approx(value, rel=1e-5, abs=1e-5), name


def test_sft_term_adds_mean_chosen_nll() -> None:
    """``dpo.sft_loss_weight``: per pair, the chosen response's mean token NLL, weighted."""
    base = DPOStage(load_recipe(DPO_RECIPE, []))
    weighted = DPOStage(load_recipe(DPO_RECIPE, ["dpo.sft_loss_weight=0.5"]))
    nll, batch = synthetic_batch(rows=3, length=30, seed=3)
    plain, _, _ = base._loss(batch, nll)
    total, _, metrics = weighted._loss(batch, nll)
    pc, _, lc, _ = per_pair_sums(nll, batch)
    nll_mean = sum(-p / n for p, n in zip(pc, lc, strict=True))
    assert float(total) == pytest.approx(float(plain) + 0.5 * nll_mean, rel=1e-5)
    assert float(metrics["nll_loss"][0] / metrics["nll_loss"][1]) == pytest.approx(nll_mean / 3, rel=1e-5)


def test_equal_policy_and_reference_give_log2_and_zero_accuracy() -> None:
    """At step 0 the policy is the reference: every reward is 0, a tie, so TRL's accuracy is 0."""
    stage = DPOStage(load_recipe(DPO_RECIPE, []))
    nll, batch = synthetic_batch(rows=4, length=20, seed=1)
    pc, pr, _, _ = per_pair_sums(nll, batch)
    batch["ref_logps"] = torch.tensor([pc, pr], dtype=torch.float32).T
    total, _, metrics = stage._loss(batch, nll)
    assert float(total) / 4 == pytest.approx(math.log(2), abs=1e-5)
    assert float(metrics["rewards/accuracies"][0]) == 0.0


# --- data ------------------------------------------------------------------------------------------


def test_pair_rows_pack_chosen_rejected_and_padding(demo_data: Path) -> None:
    from data_prep.dpo import PreferenceDataset

    path = str(demo_data / "dpo" / "train.parquet")
    pairs = PreferenceDataset(path)
    rows = PairRows(path, "data.dpo_path", 128)
    for index in (0, 17, 999):
        item, pair = rows[index], pairs[index]
        lc, lr = pair["chosen_length"], pair["rejected_length"]
        assert item["cu_seqlens"].tolist() == [0, lc, lc + lr, 128]
        for side, lo, n in (("chosen", 0, lc), ("rejected", lc, lr)):
            np.testing.assert_array_equal(item["tokens"][lo : lo + n], pair[f"{side}_tokens"][:n])
            np.testing.assert_array_equal(item["loss_mask"][lo : lo + n], pair[f"{side}_loss_mask"][:n])
            assert item["position_ids"][lo] == 0 and item["position_ids"][lo + n - 1] == n - 1
        assert (item["segment"] == np.repeat([CHOSEN, REJECTED, PADDING], [lc, lr, 128 - lc - lr])).all()
        assert item["loss_mask"][lc + lr :].sum() == 0
    with pytest.raises(ValueError, match=r"pair 0 has \d+ \+ \d+ tokens, more than train.seq_length 16"):
        PairRows(path, "data.dpo_path", 16)[0]


def test_recipe_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dpo.loss_type"):
        DPOStage.check_recipe(load_recipe(DPO_RECIPE, ["dpo.loss_type=hinge"]))
    with pytest.raises(FileNotFoundError, match="data.dpo_path"):
        DPOStage.check_recipe(load_recipe(DPO_RECIPE, [f"data.dpo_path={tmp_path / 'none.parquet'}"]))


# --- the model path --------------------------------------------------------------------------------


def test_mtp_free_logprobs_equal_gptmodel_loss(pretrain_run: Run, demo_data: Path) -> None:
    """The DPO forward (main head via output_processor, MTP skipped) gives exactly GPTModel's own
    per-token cross entropy of a normal forward (which also runs the MTP block)."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    from joyai_megatron.stages.logprobs import forward_token_nll
    from joyai_megatron.stages.sft_eval import load_checkpoint_model
    from joyai_megatron.training.distributed import shutdown
    from joyai_megatron.training.packing import pack_batch

    try:
        model, _ = load_checkpoint_model(pretrain_run.checkpoint_dir)
        assert model.mtp_process, "the fixture's checkpoint should carry the MTP block"
        rows = PairRows(str(demo_data / "dpo" / "train.parquet"), "data.dpo_path", 128)
        item = rows[5]
        cu = torch.unique_consecutive(torch.tensor(item["cu_seqlens"]))
        packed = pack_batch(*(torch.tensor(item[k])[None] for k in ("tokens", "labels", "loss_mask")),
                            torch.tensor(item["position_ids"])[None], cu_seqlens=cu)  # fmt: skip
        with torch.no_grad():
            ours = forward_token_nll(
                model, packed.tokens, packed.position_ids, packed.labels, packed.packed_seq_params
            )
            theirs = model(packed.tokens, packed.position_ids, None, labels=packed.labels,
                           loss_mask=packed.loss_mask, packed_seq_params=packed.packed_seq_params)  # fmt: skip
        MTPLossLoggingHelper.clean_metrics_in_tracker()
        assert model.mtp_process and model.config.mtp_num_layers == 1, "mtp_skipped must restore the model"
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    finally:
        shutdown()


# --- training runs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_pairs(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 48 demo pairs as their own file, so reference precomputation stays short."""
    from data_prep.dpo import prepare_dpo

    root = tmp_path_factory.mktemp("pairs")
    lines = (demo_data / "corpus" / "dpo" / "train.jsonl").read_text().splitlines()[:48]
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    prepare_dpo([str(root / "pairs.jsonl")], str(demo_data / "tokenizer"), str(root / "pairs.parquet"), 128)
    return root / "pairs.parquet"


def short_dpo(root: Path, demo: Path, sft: Run, pairs: Path, iters: int, extra: list[str]) -> Run:
    return run_stage(
        "dpo",
        DPO_RECIPE,
        root,
        [
            *dpo_overrides(demo, sft.checkpoint_dir),
            f"data.dpo_path={pairs}",
            f"train.train_iters={iters}",
            "train.global_batch_size=4",
            "train.micro_batch_size=2",
            "scheduler.decay_tokens=2048",  # 4 steps x 4 pairs x 128: the LR does not depend on iters
            *extra,
        ],
    )


def losses(run: Run) -> list[float]:
    return [h["loss"] for h in run.history]


@pytest.fixture(scope="module")
def single_process(sft_run: Run, demo_data: Path, small_pairs: Path, tmp_path_factory) -> dict[str, Run]:
    """Two steps on one process with each kind of reference."""
    root = tmp_path_factory.mktemp("dpo_single")
    return {
        mode: short_dpo(root / mode, demo_data, sft_run, small_pairs, 2, [f"dpo.reference={mode}"])
        for mode in ("live", "precomputed")
    }


def test_precomputed_reference_equals_live(
    single_process: dict[str, Run], sft_run: Run, demo_data: Path, tmp_path: Path
) -> None:
    live, pre = single_process["live"], single_process["precomputed"]
    stored = torch.load(pre.checkpoint_dir / "reference_logps.pt", weights_only=True)
    assert stored["values"]["train"].shape == (48, 2)
    assert stored["meta"]["reference"] == str(resolve_checkpoint(sft_run.checkpoint_dir))
    np.testing.assert_allclose(losses(pre), losses(live), rtol=0, atol=1e-6)
    for key in ("rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        np.testing.assert_allclose([h[key] for h in pre.history], [h[key] for h in live.history], atol=1e-5)
    # A file made for other data is refused, naming what differs.
    with pytest.raises(ValueError, match="train_pairs"):
        short_dpo(tmp_path, demo_data, sft_run, demo_data / "dpo" / "train.parquet", 3, [
            "dpo.reference=precomputed", f"dpo.reference_logps={pre.checkpoint_dir / 'reference_logps.pt'}",
        ])  # fmt: skip


LAYOUTS = {
    "tp2_sp_live": ["parallel.tp=2", "parallel.sequence_parallel=true", "dpo.reference=live"],
    "pp2_live": ["parallel.pp=2", "parallel.pp_layout=Et|ttmL", "dpo.reference=live"],
    "ep2_dp2_precomputed": ["parallel.ep=2", "dpo.reference=precomputed"],
    # Context parallelism: each pair's chosen/rejected/padding segments split over 2 ranks, the
    # per-pair log-prob sums all-reduced over CP (stages/dpo.py, _pair_logps).
    "cp2_live": ["parallel.cp=2", "dpo.reference=live"],
}


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layouts_match_single_process(
    layout: str,
    single_process: dict[str, Run],
    sft_run: Run,
    demo_data: Path,
    small_pairs: Path,
    tmp_path: Path,
) -> None:
    """2 gloo ranks: vocab-parallel log-probs with the sequence-parallel padding mask (TP=2), the
    reference run through the pipeline schedule (PP=2), the precomputation split over data-parallel
    ranks (DP=2), pairs split over context-parallel ranks (CP=2): the same losses and rewards as
    one process, to fp32 rounding."""
    from tests.joyai_helpers import read_metrics, run_joyai

    overrides = [
        *dpo_overrides(demo_data, sft_run.checkpoint_dir), f"data.dpo_path={small_pairs}", "train.train_iters=2",
        "train.global_batch_size=4", "train.micro_batch_size=2", "scheduler.decay_tokens=2048",
        f"checkpoint.dir={tmp_path / 'ckpt'}", f"logging.dir={tmp_path / 'logs'}", "logging.tensorboard=false",
        "logging.interval=1", *LAYOUTS[layout],
    ]  # fmt: skip
    result = run_joyai("dpo", DPO_RECIPE, overrides, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = single_process["live"].history
    got = read_metrics(tmp_path / "logs")
    assert [m["step"] for m in got] == [1, 2]
    # Step 1 compares the same weights (fp32 rounding, 1e-5); step 2 follows one Muon update, whose
    # Newton-Schulz normalisation turns the ~4e-5 relative grad-norm difference of the layouts
    # (fp32 accumulation order, tests/parallel) into a step that moves the loss by up to ~2e-5 and
    # the margins/log-probs (sums over ~25 tokens) by up to ~6e-5 (the bug this guards against,
    # lost TP gradients, moved them by 1e-2).
    for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
        mine, ref = [m[key] for m in got], [h[key] for h in expected]
        np.testing.assert_allclose(mine[0], ref[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(mine[1], ref[1], rtol=5e-5, atol=2e-4)
    if layout.startswith("cp"):
        # The pair count comes from one CP rank: counted on every rank it would scale the gradient
        # by 1/cp, which the Muon/Adam updates hide but the step-1 gradient norm shows.
        np.testing.assert_allclose(got[0]["grad_norm"], expected[0]["grad_norm"], rtol=1e-4)
    if "precomputed" in layout:
        mine = torch.load(tmp_path / "ckpt" / "reference_logps.pt", weights_only=True)["values"]["train"]
        ref = torch.load(
            single_process["precomputed"].checkpoint_dir / "reference_logps.pt", weights_only=True
        )
        torch.testing.assert_close(mine, ref["values"]["train"], rtol=1e-5, atol=1e-5)


def test_dpo_resume_is_exact(sft_run: Run, demo_data: Path, small_pairs: Path, tmp_path: Path) -> None:
    """4 steps straight == 2 steps + a resumed run to 4 (bitwise), with the live reference rebuilt
    from checkpoint.load on resume."""
    straight = short_dpo(tmp_path / "straight", demo_data, sft_run, small_pairs, 4, [])
    first = short_dpo(tmp_path / "split", demo_data, sft_run, small_pairs, 2, [])
    resumed = short_dpo(tmp_path / "split", demo_data, sft_run, small_pairs, 4, [])
    assert [h["step"] for h in resumed.history] == [3, 4]
    assert losses(first) + losses(resumed) == losses(straight)
    assert [h["rewards/margins"] for h in resumed.history] == [
        h["rewards/margins"] for h in straight.history[2:]
    ]


def test_dpo_learns_preferences_and_keeps_mtp(sft_run: Run, demo_data: Path, stages_root: Path) -> None:
    """The tiny recipe lifts rewards/accuracies from 0 (ties at step 1) to >= 0.9; the MTP block
    leaves DPO bit-identical to the SFT checkpoint's while the rest of the model moved."""
    from joyai_megatron.stages.sft_eval import load_checkpoint_model
    from joyai_megatron.training.distributed import shutdown

    run = run_stage("dpo", DPO_RECIPE, stages_root / "dpo", dpo_overrides(demo_data, sft_run.checkpoint_dir))
    acc = [h["rewards/accuracies"] for h in run.history]
    summary = {"seconds": round(run.seconds, 1), "first": acc[:3], "last5": acc[-5:], "loss": losses(run)[-1]}
    print("DPO demo:", json.dumps(summary))
    assert acc[0] == 0.0
    assert np.mean(acc[-5:]) >= 0.9, summary
    try:
        sft_model, _ = load_checkpoint_model(sft_run.checkpoint_dir)
        sft = {k: v.clone() for k, v in sft_model.state_dict().items() if torch.is_tensor(v)}
        dpo_model, _ = load_checkpoint_model(run.checkpoint_dir)
        dpo = dpo_model.state_dict()
    finally:
        shutdown()
    mtp = [k for k in sft if k.startswith("mtp.")]
    assert mtp and all(torch.equal(sft[k], dpo[k]) for k in mtp)
    assert not torch.equal(sft["output_layer.weight"], dpo["output_layer.weight"])
