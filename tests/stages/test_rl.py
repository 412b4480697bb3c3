"""The rl stage end to end on CPU: rollouts, losses, metrics, weight sync, async, resume.

Trainer runs are in-process (a few seconds each); the 10-minute learning run is the demo's job
(docs/rl.md gives its numbers).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.stages.rl_fixtures import train_rl, write_rl_recipe
from tests.stages.stage_helpers import assert_same_step_metrics, rewind_checkpoints

pytestmark = pytest.mark.slow


def _megatron_logits(trainer, ids: torch.Tensor) -> torch.Tensor:
    from joyai_megatron.training.checkpoint import unwrap

    model = unwrap(trainer.model[0]).eval()
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]).expand_as(ids), None).float()


def test_fiberpo_loop_metrics_weights_and_sync(rl_data, tmp_path, shutdown):
    recipe = write_rl_recipe(tmp_path, rl_data, rl={"routing_replay": True, "tis_clip": 2.0})
    trainer, result, before = train_rl(recipe)
    history = result["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    rollout_steps = [h for h in history if "stage/reward" in h]
    assert len(rollout_steps) == 2  # two steps per rollout
    for key in (
        "stage/reward", "stage/pass@1", "stage/response_length", "stage/filtered_frac",
        "stage/mismatch/logprob_abs_mean", "stage/time/generate_s",
    ):  # fmt: skip
        assert all(key in h for h in rollout_steps), key
    trained = [h for h in history if "stage/pg_loss" in h]
    assert trained, "no step had a zero-variance-free group"
    for key in (
        "stage/entropy", "stage/ratio_mean", "stage/ratio_max", "stage/gate_pos_pass_frac",
        "stage/tokens_gate_pass_frac", "stage/tokens_gate_rollback_frac", "stage/tokens_gate_gated_frac",
        "policy_loss",
    ):  # fmt: skip
        assert all(key in h for h in trained), key
    for h in history:
        assert all(math.isfinite(v) for v in h.values() if isinstance(v, float)), h
    fractions = sum(trained[0][f"stage/tokens_gate_{r}_frac"] for r in ("pass", "rollback", "gated"))
    assert fractions == pytest.approx(1.0)
    # On-policy at the first mini-batch of a rollout (same weights, replayed routing): r = 1 exactly,
    # and the trainer's recomputed log-probs equal the rollout engine's (the alignment check).
    first = [h for h in trained if h["step"] % 2 == 1]
    assert first and all(h["stage/ratio_max"] == pytest.approx(1.0, abs=1e-5) for h in first)
    assert all(h["stage/mismatch/logprob_abs_max"] < 1e-4 for h in rollout_steps)
    assert "stage/eval/pass@1" in history[0] and "stage/eval/pass@1" in history[-1]

    from joyai_megatron.rl.reference import snapshot

    after = snapshot(trainer.model)
    assert any(not torch.equal(before[k], after[k]) for k in before), "weights did not change"
    # Weight sync: the HF rollout model reproduces the trained Megatron model's logits (the engine
    # process was shut down with the run; the in-process engine shares its weight writer).
    from joyai_megatron.rl.rollout.local import LocalHFEngine

    manager = trainer.stage.manager
    manager.engine = LocalHFEngine(manager.arch)
    manager.sync(trainer.model, iteration=-1)
    ids = torch.randint(3, trainer.arch.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    hf = manager.engine.forward_logits(ids)
    assert torch.allclose(hf, _megatron_logits(trainer, ids), atol=1e-4, rtol=0)


def test_grpo_from_the_same_recipe_and_kl_to_the_start(rl_data, tmp_path, shutdown):
    from joyai_megatron.training.distributed import shutdown as close

    recipe = write_rl_recipe(tmp_path, rl_data, train={"train_iters": 2}, rl={"eval_interval": 0})
    _, result, _ = train_rl(recipe, ["rl.loss=grpo"])
    trained = [h for h in result["history"] if "stage/pg_loss" in h]
    assert trained
    for key in ("stage/tokens_clip_pass_frac", "stage/clip_low_frac", "stage/entropy", "stage/ratio_max"):
        assert key in trained[0], key
    close()
    # KL to the starting checkpoint (swapped-in reference weights): exactly 0 before any update.
    kl_recipe = write_rl_recipe(
        tmp_path / "kl",
        rl_data,
        train={"train_iters": 1},
        rl={
            "eval_interval": 0,
            "kl_coef": 0.1,
            "kl_type": "k1",
            "steps_per_rollout": 1,
            "prompts_per_step": 1,
        },
        checkpoint={"load": str(tmp_path / "ckpt"), "load_optimizer": False, "reset_counters": True},
    )
    trainer, result, before = train_rl(kl_recipe, ["rl.loss=grpo"])
    assert result["history"][0]["stage/kl"] == pytest.approx(0.0, abs=1e-6)
    from joyai_megatron.rl.reference import snapshot

    reference = trainer.stage.reference
    assert all(torch.equal(reference[k], before[k]) for k in reference)  # the reference is the start
    assert any(not torch.equal(before[k], t) for k, t in snapshot(trainer.model).items())


def _final_state(trainer) -> dict[str, torch.Tensor]:
    from joyai_megatron.rl.reference import snapshot

    return snapshot(trainer.model)


def test_resume_is_exact_mid_rollout_and_async(rl_data, tmp_path, shutdown):
    """Async mode, two steps per rollout: a checkpoint at step 3 holds both a half-used rollout and
    the next rollout already generated; resuming from it must reproduce step 4 exactly."""
    from joyai_megatron.training.distributed import shutdown as close

    overrides = {"rl": {"async_rollout": True, "eval_interval": 0}, "checkpoint": {"save_interval": 3}}
    straight = write_rl_recipe(tmp_path / "a", rl_data, **overrides)
    trainer, result, _ = train_rl(straight)
    reference = _final_state(trainer)
    step4 = result["history"][-1]
    close()

    resumed_dir = tmp_path / "b"
    rewind_checkpoints(tmp_path / "a" / "ckpt", resumed_dir / "ckpt", 3)
    recipe = write_rl_recipe(resumed_dir, rl_data, **overrides)
    trainer, result, _ = train_rl(recipe)
    assert [h["step"] for h in result["history"]] == [4]
    assert_same_step_metrics(result["history"][0], step4)
    state = _final_state(trainer)
    differ = {
        k: float((reference[k] - state[k]).abs().max())
        for k in reference
        if not torch.equal(reference[k], state[k])
    }
    assert not differ, differ


def test_engine_payload_is_the_hf_checkpoint_layout(tmp_path, shutdown):
    """What vLLM / SGLang receive: every HF checkpoint tensor of the table once (MTP and its copies
    included), and, saved as safetensors, a checkpoint transformers loads to the same logits."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    from joyai_megatron.convert.hf_config import arch_to_hf_config
    from joyai_megatron.convert.mapping import mapping_table
    from joyai_megatron.model.presets import TINY
    from joyai_megatron.rl.rollout.engines import buckets
    from joyai_megatron.rl.rollout.weight_sync import full_model_hf_weights
    from joyai_megatron.training.checkpoint_model import build_megatron_model, init_single_process

    init_single_process()
    arch = TINY.replace(vocab_size=512)
    model = build_megatron_model(arch, mtp=True)
    payload = list(full_model_hf_weights([model], arch, include_mtp=True))
    names = [n for n, _ in payload]
    assert len(names) == len(set(names))
    expected = mapping_table(arch, include_mtp=True).hf_shapes(with_copies=True)
    assert {n: tuple(t.shape) for n, t in payload} == expected
    groups = list(buckets(iter(payload), max_bytes=64 * 1024))
    assert [n for g in groups for n, _ in g] == names
    assert all(sum(t.numel() * t.element_size() for _, t in g) <= 64 * 1024 or len(g) == 1 for g in groups)

    mtp_prefix = f"model.layers.{arch.num_layers}."  # transformers does not implement the MTP layer
    main = [(n, t) for n, t in payload if not n.startswith(mtp_prefix)]
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    save_file({n: t.contiguous() for n, t in main}, hf_dir / "model.safetensors", metadata={"format": "pt"})
    import json

    (hf_dir / "config.json").write_text(
        json.dumps(arch_to_hf_config(arch, include_mtp=False, dtype="float32"))
    )
    ids = torch.randint(3, arch.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        want = model(ids, torch.arange(16).expand_as(ids), None).float()
    # A fresh interpreter loads the directory, as a serving engine would (and as transformers does
    # not guarantee bitwise-clean state in a process that already ran other models).
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys, torch\n"
        "from transformers import DeepseekV3ForCausalLM\n"
        "d = sys.argv[1]\n"
        "hf, info = DeepseekV3ForCausalLM.from_pretrained(d + '/hf', dtype=torch.float32, output_loading_info=True)\n"
        "assert not any(info.values()), info\n"
        "with torch.no_grad():\n"
        "    torch.save(hf.eval()(torch.load(d + '/ids.pt')).logits.float(), d + '/got.pt')\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=300)
    got = torch.load(tmp_path / "got.pt")
    assert torch.allclose(got, want, atol=1e-4, rtol=0)


def test_gpu_engines_fail_clearly_without_their_package():
    from joyai_megatron.model.presets import TINY
    from joyai_megatron.rl.rollout import build_engine

    for backend in ("vllm", "sglang"):
        try:
            __import__(backend)
        except ImportError:
            with pytest.raises(RuntimeError, match=f"needs the '{backend}' package"):
                build_engine(backend, TINY, {}, "bf16")
    with pytest.raises(ValueError, match="rollout_backend must be one of"):
        build_engine("trtllm", TINY, {}, "bf16")


def test_schema_defaults_are_the_loss_defaults():
    import inspect

    from joyai_megatron.config.schema import RLCfg
    from joyai_megatron.rl import fiberpo_domain_loss, fiberpo_loss, grpo_loss

    cfg = RLCfg()
    fp = inspect.signature(fiberpo_loss).parameters
    assert (cfg.delta, cfg.c_minus, cfg.eps) == (
        fp["delta"].default,
        fp["c_minus"].default,
        fp["eps"].default,
    )
    dom = inspect.signature(fiberpo_domain_loss).parameters
    for key in ("group_delta", "group_c_minus", "domain_delta", "domain_c_minus"):
        assert getattr(cfg, key) == dom[key].default, key
    assert cfg.clip_eps_low is None and cfg.clip_eps_high is None  # each loss's own default
    assert inspect.signature(grpo_loss).parameters["dual_clip"].default == cfg.dual_clip


def test_rows_align_logprob_positions_with_response_tokens():
    from joyai_megatron.rl.batch import Trajectory, micro_batches, split_evenly

    traj = Trajectory([5, 6, 7], [8, 9, 1], [-0.1, -0.2, -0.3], reward=1.0, group=0, domain=0, advantage=0.5)
    (batch,) = micro_batches([traj], 1, 2, 10, pad_id=2, first_index=3)
    assert batch["tokens"][0].tolist() == [5, 6, 7, 8, 9, 1, 2, 2, 2, 2]
    # position j predicts token j + 1: the response tokens 8, 9, 1 are predicted at 2, 3, 4
    assert batch["loss_mask"][0].nonzero().flatten().tolist() == [2, 3, 4]
    assert batch["labels"][0, 2:5].tolist() == [8, 9, 1]
    assert batch["rollout_logprobs"][0, 2:5].tolist() == pytest.approx([-0.1, -0.2, -0.3])
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]  # padding: own segment
    assert batch["loss_mask"][1].sum() == 0 and batch["advantages"].tolist() == [0.5, 0.0]
    assert int(batch["mb_index"]) == 3
    assert [len(p) for p in split_evenly(list(range(7)), 3)] == [3, 2, 2]


def test_prompt_order_is_a_function_of_the_rollout():
    import numpy as np

    from joyai_megatron.rl.prompts import epoch_order

    first = epoch_order(10, 25, 0, seed=3)
    assert np.array_equal(first[5:12], epoch_order(10, 7, 5, seed=3))
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:20].tolist()) == list(range(10))


def test_logprobs_and_entropy_match_log_softmax(shutdown, monkeypatch):
    from joyai_megatron.rl import logprobs
    from joyai_megatron.rl.logprobs import token_entropy, token_logprobs
    from joyai_megatron.training.checkpoint_model import init_single_process

    init_single_process()
    monkeypatch.setattr(logprobs, "ENTROPY_CHUNK", 3)  # 7 tokens: three slices
    logits = torch.randn(1, 7, 11, generator=torch.Generator().manual_seed(0))
    original = logits.clone()
    targets = torch.randint(0, 11, (1, 7))
    for temperature in (0.7, 1.0):
        logp = torch.log_softmax(logits / temperature, -1)
        got = token_logprobs(logits, targets, temperature)
        assert torch.allclose(got, logp.gather(-1, targets[..., None])[..., 0], atol=1e-6)
        assert torch.equal(logits, original)  # the in-place cross entropy works on a copy
        assert torch.allclose(token_entropy(logits, temperature), -(logp.exp() * logp).sum(-1), atol=1e-5)
    bf16 = logits.bfloat16().requires_grad_()
    token_logprobs(bf16, targets, 0.7).sum().backward()  # the in-place temperature keeps autograd
    want = torch.autograd.grad(
        torch.log_softmax(bf16.float() / 0.7, -1).gather(-1, targets[..., None]).sum(), bf16
    )[0]
    assert torch.allclose(bf16.grad.float(), want.float(), atol=1e-2)


def test_48b_recipe_fits_its_cluster(capsys):
    """The shipped 48B recipe on the cluster its comments name (16 nodes x 8 80-GB GPUs) passes
    the Slurm preflight; without activation recompute its 16K-token rows would not fit."""
    import json

    from joyai_megatron import cli

    recipe = str(Path(__file__).resolve().parents[2] / "recipes" / "rl" / "joyai_48b_a3b_fiberpo.yaml")
    cluster = ["--nodes", "16", "--gpus-per-node", "8", "--gpu-memory-gb", "80", "--json"]
    assert cli.main(["plan", recipe, *cluster]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] and report["layout"]["world_size"] == 128
    from joyai_megatron.rl.logprobs import ENTROPY_CHUNK

    entropy_slices = 4 * ENTROPY_CHUNK * 129280 * 4 / 1e9  # the loss's fp32 temporaries, not in plan
    assert report["per_gpu_gb"] + entropy_slices <= report["usable_gb"]
    assert cli.main(["plan", recipe, "model.recompute=none", *cluster]) == 1
    assert not json.loads(capsys.readouterr().out)["fits"]


def test_math_format_reward():
    from joyai_megatron.rl.rewards import get_reward

    reward = get_reward("math_format")
    assert reward("Answer: 5", "5") == 1.0
    assert reward("<think>\nsum\n</think>\n\nAnswer: 12", "5") == pytest.approx(0.2)
    assert reward("Answer: CAM", "5") == 0.0


def test_recipe_errors_name_the_key(rl_data, tmp_path):
    from joyai_megatron.config.recipe import load_recipe
    from joyai_megatron.rl.recipe_checks import check_rl_recipe

    path = write_rl_recipe(tmp_path, rl_data)
    for override, message in (
        ("train.global_batch_size=8", "train.global_batch_size must be"),
        ("model.mtp_enabled=true", "model.mtp_enabled"),
        ("rl.loss=ppo", "rl.loss must be one of"),
        ("rl.c_minus=0.001", "C- < C+"),
        ("rl.kl_coef=0.1", "checkpoint.load"),
    ):
        with pytest.raises(ValueError, match=message):
            check_rl_recipe(load_recipe(str(path), [override]))


def test_code_reward_steps_score_every_sample_in_the_sandbox(rl_data, tmp_path, shutdown, monkeypatch):
    """Two FiberPO steps scored by the ``code`` verifier: every sample and evaluation prompt is one
    isolated sandbox run (judge + solution processes), and the rewards are its verdicts."""
    from joyai_megatron.rl.rewards import code_tests
    from joyai_megatron.rl.rewards.sandbox import bubblewrap_available

    if not bubblewrap_available():
        pytest.skip("no isolation mechanism: bubblewrap is unusable here")
    verdicts: list[bool] = []
    original = code_tests.run_python_tests

    def isolated_run(solution: str, tests: str, **limits):
        result = original(solution, tests, isolated=True, **limits)
        verdicts.append(result.passed)
        return result

    monkeypatch.setattr(code_tests, "run_python_tests", isolated_run)
    recipe = write_rl_recipe(
        tmp_path, rl_data, train={"train_iters": 2}, rl={"reward": "rl_test_code_parity"}
    )
    _, result, _ = train_rl(recipe)
    history = result["history"]
    rollout = history[0]
    assert len(verdicts) == 2 * 4 + 2 * 4  # one rollout of 2 prompts x 4 samples, two evaluations of 4
    assert any(verdicts) and not all(verdicts)
    assert rollout["stage/reward"] == pytest.approx(sum(verdicts[4:12]) / 8)
    assert any("stage/pg_loss" in h for h in history)


def test_code_rewards_need_a_sandbox_or_the_opt_in(rl_data, tmp_path, monkeypatch):
    from joyai_megatron.config.recipe import load_recipe
    from joyai_megatron.rl import recipe_checks

    monkeypatch.setattr(recipe_checks, "bubblewrap_available", lambda: False)
    path = write_rl_recipe(tmp_path, rl_data)
    with pytest.raises(ValueError, match="unsafe_code_execution"):
        recipe_checks.check_rl_recipe(load_recipe(str(path), ["rl.reward=code"]))
    recipe_checks.check_rl_recipe(load_recipe(str(path), ["rl.reward=code", "rl.unsafe_code_execution=true"]))


@pytest.mark.multiproc
def test_tensor_parallel_two_ranks(rl_data, tmp_path):
    """TP=2 (sequence parallel): vocab-parallel log-probs and entropy, TP-gathered weight sync and
    the rollout broadcast to the TP peer; the recomputed log-probs must still match the engine's."""
    from tests.joyai_helpers import read_metrics, run_joyai

    recipe = write_rl_recipe(
        tmp_path,
        rl_data,
        train={"train_iters": 2},
        rl={"reward": "math_format", "eval_interval": 0, "filter_zero_variance": False},
    )
    result = run_joyai(
        "rl", recipe, ["parallel.tp=2", "parallel.sequence_parallel=true"], nproc=2, timeout=600
    )
    assert result.returncode == 0
    rows = read_metrics(tmp_path / "logs")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["stage/mismatch/logprob_abs_max"] < 1e-4
    assert math.isfinite(rows[0]["stage/entropy"])


@pytest.mark.multiproc
def test_expert_parallel_two_ranks_matches_one(rl_data, tmp_path, shutdown):
    """EP=2 on 2 gloo ranks (each holds 4 of the 8 experts per layer; TP=2 with sequence
    parallelism beside it, so there is one data-parallel replica and both runs draw the same
    rollouts) with R3 routing replay, from the same step-0 checkpoint as a single-rank run: the
    same rollout, step 1's loss, gradient norm, entropy and engine log-prob agreement, and step 2's
    ratios after the update. (Step 1 is on-policy, where FiberPO's loss is 0 for whole groups; the
    gradient norm is the sharp check.)"""
    from joyai_megatron.training.distributed import shutdown as close
    from tests.joyai_helpers import read_metrics
    from tests.stages.rl_fixtures import run_rl_ranks

    init = write_rl_recipe(
        tmp_path / "init", rl_data, train={"train_iters": 0},
        rl={"eval_interval": 0, "rollout_args": {"process": False}},
    )  # fmt: skip
    train_rl(init)
    close()
    load = [f"checkpoint.load={tmp_path / 'init' / 'ckpt'}", "checkpoint.load_optimizer=false"]
    sections = {"train": {"train_iters": 2}, "rl": {"eval_interval": 0, "routing_replay": "r3"}}
    single = write_rl_recipe(tmp_path / "single", rl_data, **sections)
    _, result, _ = train_rl(single, load)
    expected = result["history"]
    close()
    ranks = write_rl_recipe(tmp_path / "ep2", rl_data, **sections)
    layout = ["parallel.ep=2", "parallel.tp=2", "parallel.sequence_parallel=true"]
    assert run_rl_ranks(ranks, load + layout, nproc=2).returncode == 0
    got = read_metrics(tmp_path / "ep2" / "logs")
    assert [r["step"] for r in got] == [h["step"] for h in expected] == [1, 2]
    first, ref = got[0], expected[0]
    for key in ("stage/reward", "stage/response_length", "stage/filtered_frac"):
        assert first[key] == ref[key], key  # the same rollout
    for key in ("policy_loss", "stage/pg_loss", "stage/entropy"):
        assert first[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
    assert first["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    assert first["stage/mismatch/logprob_abs_max"] < 1e-5
    # Step 2 trains on the rollout's second half after one Adam update (off-policy: ratio > 1).
    second, ref2 = got[1], expected[1]
    assert second["stage/ratio_max"] > 1.0
    for key in ("stage/ratio_max", "stage/pg_loss", "stage/entropy"):
        assert second[key] == pytest.approx(ref2[key], rel=1e-3, abs=1e-6), (key, second[key], ref2[key])
