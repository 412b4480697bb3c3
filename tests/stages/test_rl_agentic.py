"""Agentic RL end to end on CPU: the toy calculator task's SFT warm start, then multi-turn FiberPO
(metrics, multi-turn mechanics), exact resume mid-rollout in async mode, a hostile python tool call
inside a training episode. The full 20-point run is ``benchmarks/rl_agentic.py`` (docs/rl.md
section 11)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.joyai_helpers import REPO
from tests.stages.stage_helpers import assert_same_step_metrics, rewind_checkpoints, run_stage

pytestmark = pytest.mark.slow

SFT_RECIPE = REPO / "recipes" / "sft" / "tiny_cpu_agentic.yaml"
RL_RECIPE = REPO / "recipes" / "rl" / "tiny_cpu_agentic.yaml"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The documented runs use OMP_NUM_THREADS=1 (benchmarks/rl_agentic.py): the toy RL's outcome is
    sensitive to CPU matmul rounding, and a 2-thread run of the same recipe took another path
    (held-out tool use 0 -> 0 where the 1-thread run goes 0 -> 1.0), so the test runs as documented."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def agentic_sft(tmp_path_factory, one_thread) -> tuple[Path, Path]:
    """(data dir, SFT checkpoint dir): the recipe's warm start as shipped (300 steps, ~3 min)."""
    from data_prep.agentic_demo import build_agentic_demo
    from joyai_megatron.training.distributed import shutdown as close

    root = tmp_path_factory.mktemp("agentic")
    data = root / "data"
    build_agentic_demo(data)
    run = run_stage(
        "sft",
        SFT_RECIPE,
        root / "sft",
        [
            f"data.tokenizer={data / 'tokenizer'}",
            f"data.cache_dir={data / 'cache'}",
            f"data.sft_path={data / 'sft' / 'train.parquet'}",
            "checkpoint.save_interval=0",
        ],
    )
    close()
    return data, run.checkpoint_dir


def _rl_overrides(data: Path, load: Path | None, root: Path) -> list[str]:
    return [
        f"data.tokenizer={data / 'tokenizer'}",
        f"data.cache_dir={data / 'cache'}",
        f"data.rl_path={data / 'rl' / 'train.jsonl'}",
        f"rl.eval_path={data / 'rl' / 'eval.jsonl'}",
        f"checkpoint.load={load}" if load else "checkpoint.load=null",
        f"checkpoint.dir={root / 'ckpt'}",
        f"logging.dir={root / 'logs'}",
        "logging.tensorboard=false",
        "logging.interval=1",
    ]


def _train(overrides: list[str]):
    from joyai_megatron.config.recipe import load_recipe
    from joyai_megatron.rl.reference import snapshot
    from joyai_megatron.stages.rl import RLStage
    from joyai_megatron.training.trainer import Trainer

    recipe = load_recipe(str(RL_RECIPE), overrides)
    trainer = Trainer(recipe, RLStage)
    result = trainer.train()
    return trainer, result, snapshot(trainer.model)


def test_agentic_fiberpo_learns_to_use_the_calculator(agentic_sft, tmp_path, shutdown):
    data, sft = agentic_sft
    overrides = _rl_overrides(data, sft, tmp_path) + [
        "train.train_iters=20",
        "rl.eval_interval=10",
        "rl.eval_prompts=32",
        "checkpoint.save_interval=0",
    ]
    _, result, _ = _train(overrides)
    history = result["history"]
    rollouts = [h for h in history if "stage/reward" in h]
    for key in (
        "stage/reward", "stage/pass@1", "stage/response_length", "stage/filtered_frac",
        "stage/turns_per_episode", "stage/tool_calls_per_episode",
        "stage/truncated_frac", "stage/tool_use_frac",
    ):  # fmt: skip
        assert all(key in h for h in rollouts), key
    kept = [h for h in rollouts if h["stage/filtered_frac"] < 1.0]  # some group had reward variance
    assert kept and all("stage/mismatch/logprob_abs_max" in h for h in kept)
    # The error rate is per call: logged by the rollouts that made calls.
    assert all(("stage/tool_error_rate" in h) == (h["stage/tool_calls_per_episode"] > 0) for h in rollouts)
    trained = [h for h in history if "stage/pg_loss" in h]
    assert trained and all("stage/tokens_gate_pass_frac" in h for h in trained)
    for h in history:
        assert all(math.isfinite(v) for v in h.values() if isinstance(v, float)), h
    # Multi-turn: episodes that call the calculator take two turns.
    assert max(h["stage/turns_per_episode"] for h in rollouts) > 1.0
    # The trainer's recomputed log-probs of the policy tokens match the engine's: the tool
    # replies in between are context, never scored.
    assert all(h["stage/mismatch/logprob_abs_max"] < 1e-4 for h in kept)
    start, end = history[0], history[-1]
    assert end["stage/eval/at_step"] == 20.0
    print(
        "eval pass@1", start["stage/eval/pass@1"], "->", end["stage/eval/pass@1"],
        "tool use", start["stage/eval/tool_use"], "->", end["stage/eval/tool_use"],
    )  # fmt: skip
    # No learning-direction assertion: whether 20 steps of the toy lift held-out success depends on
    # the CPU's matmul rounding in the SFT warm start and the rollouts (see one_thread). Measured:
    # tool use 0 -> 1.0 on the machine this test was written on; 0 -> 0 with pass@1 0 -> 0.0625 on
    # an AMD EPYC machine (2026-12-04, b8018ff); pass@1 0.0625 -> 0.0625 there after the local
    # attention's per-document path changed the warm start's rounding (same day, 2953573). The
    # learning curve is benchmarks/rl_agentic.py's measurement (docs/rl.md); this test checks the
    # mechanics above (multi-turn episodes, tool calls, metrics, log-prob agreement).


def test_agentic_resume_is_exact_mid_rollout_and_async(agentic_sft, tmp_path, shutdown):
    """Async, two steps per rollout: the checkpoint at step 3 holds half a rollout of episodes and
    the next rollout's episodes already played; resuming must reproduce step 4 exactly."""
    from joyai_megatron.training.distributed import shutdown as close

    data, sft = agentic_sft
    common = [
        "train.train_iters=4",
        "train.micro_batch_size=4",
        "train.global_batch_size=8",
        "rl.prompts_per_step=4",
        "rl.group_size=4",
        "rl.async_rollout=true",
        "rl.eval_interval=0",
        "rl.agentic.advantage_level=turn",
        "rl.agentic.tool_error_penalty=0.1",
        "checkpoint.save_interval=3",
    ]
    _, result, reference = _train(_rl_overrides(data, sft, tmp_path / "a") + common)
    step4 = result["history"][-1]
    assert "stage/turns_per_episode" in result["history"][0]
    close()

    rewind_checkpoints(tmp_path / "a" / "ckpt", tmp_path / "b" / "ckpt", 3)
    _, result, state = _train(_rl_overrides(data, sft, tmp_path / "b") + common)
    assert [h["step"] for h in result["history"]] == [4]
    assert_same_step_metrics(result["history"][0], step4)
    differ = [k for k in reference if not (reference[k] == state[k]).all()]
    assert not differ, differ
