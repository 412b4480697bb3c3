"""Context parallelism on 2 gloo processes (``local`` backend: K/V all-gathered over the CP group)
against one process, from the same weights.

The weights are a briefly trained tiny model (so per-token losses differ along a sequence and the
routers' expert bias is not zero: a uniform model at init would hide per-rank normalisation
errors).  ``cp_worker.py`` runs one forward-backward of the same global batch at CP=1 and CP=2 for
whole causal rows, packed documents (padded to multiples of 4 at CP=2) and packed conversations
through the SFT stage, and returns the logged losses and every parameter's finalized gradient.
The tiny stage-4 recipe (CP=2 on 2 processes) then trains from the same weights, and a resume of
its step-2 checkpoint at CP=1 continues with the same losses.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from joyai_megatron.training.checkpoint import TRACKER
from tests.joyai_helpers import REPO, clean_env, free_port, read_metrics, run_joyai, write_mock_recipe

WORKER = "tests.parallel.cp_worker"  # run as a module from the repository root (it imports tests.*)
ARCH = {"vocab_size": 512}  # small head: attention and MoE activations dominate the memory check
CASES = ("rows", "documents", "sft")


def _run_worker(recipe: Path, out: Path, overrides: list[str], nproc: int) -> dict:
    if nproc == 1:
        cmd = [sys.executable, "-m", WORKER]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port()), "-m", WORKER]  # fmt: skip
    result = subprocess.run(
        [*cmd, str(recipe), str(out), *overrides],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny model after 8 AdamW steps on mock data (MTP on): the starting weights of every run."""
    root = tmp_path_factory.mktemp("cp")
    recipe = write_mock_recipe(
        root / "init", model={"arch": ARCH}, optim={"optimizer": "adam", "lr": 1e-2}, train={"train_iters": 8}
    )
    assert run_joyai("pretrain", recipe).returncode == 0
    return root


@pytest.fixture(scope="module")
def workers(trained: Path) -> dict[int, dict]:
    recipe = write_mock_recipe(trained / "worker", model={"arch": ARCH}, optim={"optimizer": "adam"})
    load = [f"checkpoint.load={trained / 'init' / 'ckpt'}", "checkpoint.load_optimizer=false"]
    return {
        cp: _run_worker(recipe, trained / f"worker_cp{cp}.pt", [*load, f"parallel.cp={cp}"], nproc=cp)
        for cp in (1, 2)
    }


@pytest.mark.multiproc
@pytest.mark.parametrize("case", CASES)
def test_cp2_step_matches_one_process(workers: dict[int, dict], case: str) -> None:
    one, two = workers[1][case], workers[2][case]
    assert workers[2]["cp"] == 2 and workers[1]["cp"] == 1
    # Logged losses: per-token LM loss and the MTP loss (Megatron-Core's per-micro-batch mean),
    # to fp32 rounding.
    for key in ("lm_loss", "mtp_loss"):
        assert abs(one["losses"][key] - two["losses"][key]) <= 1e-5, (case, key, one["losses"], two["losses"])
    assert one["losses"]["lm_loss"] < 5.0  # trained weights: not the uniform ln(512) = 6.24
    # Every parameter's gradient after finalize_model_grads (sum over DP x CP, / global token count).
    assert one["grads"].keys() == two["grads"].keys()
    norm1 = torch.sqrt(sum(g.double().pow(2).sum() for g in one["grads"].values()))
    norm2 = torch.sqrt(sum(g.double().pow(2).sum() for g in two["grads"].values()))
    assert float(norm2) == pytest.approx(float(norm1), rel=1e-5)
    for name, g1 in one["grads"].items():
        g2 = two["grads"][name]
        scale = float(g1.abs().max()) + 1e-12
        assert float((g1 - g2).abs().max()) <= 1e-5 * scale, (case, name, float((g1 - g2).abs().max()), scale)
    # The aux-loss-free bias update saw the same expert loads (CP's padding masked out).
    assert torch.equal(one["expert_bias"], two["expert_bias"]), case


@pytest.mark.multiproc
def test_plan_estimates_the_cp_activation_memory(workers: dict[int, dict]) -> None:
    """The bytes autograd keeps for one micro-batch's forward (rank 0) against ``plan``'s estimate
    with its CP terms (K/V all-gathered over the CP group, the [T, cp*T] mask): the estimate keeps
    the same ratio to the measurement at CP=2 as at CP=1; without the CP terms it would drop 18%."""
    from joyai_megatron.model.presets import TINY
    from joyai_megatron.training import plan

    arch = TINY.replace(**ARCH)
    chunk = plan.Chunk(layers=list(range(arch.num_layers)), embedding=True, loss=True, mtp=1)
    ratios = {}
    for cp in (1, 2):
        setting = plan.ActivationSetting(256 // cp, 4, 1, 1, False, "none", frozenset(), True, cp=cp)
        estimate, _ = plan.chunk_activation(arch, chunk, setting, 1)
        ratios[cp] = estimate / workers[cp]["saved_bytes"]
        assert 0.6 < ratios[cp] < 1.4, (cp, estimate, workers[cp]["saved_bytes"])
    assert ratios[2] == pytest.approx(ratios[1], rel=0.05), ratios


STAGE4 = REPO / "recipes" / "pretrain" / "tiny_cpu" / "stage4.yaml"


def _stage4_overrides(root: Path, trained: Path) -> list[str]:
    return [
        "data.mock=true", "data.tokenizer=''", "data.blend=null", f"data.cache_dir={root / 'cache'}",
        "train.eval_interval=0", "train.train_iters=4", "logging.tensorboard=false", "logging.interval=1",
        f"logging.dir={root / 'logs'}", f"checkpoint.dir={root / 'ckpt'}", "checkpoint.save_interval=2",
        f"checkpoint.load={trained / 'init' / 'ckpt'}", f"model.arch.vocab_size={ARCH['vocab_size']}",
    ]  # fmt: skip


@pytest.mark.multiproc
def test_tiny_stage4_runs_with_cp2_and_resumes_at_cp1(trained: Path) -> None:
    """The tiny stage-4 recipe (its own layout: CP=2) on 2 processes, 4 steps with a checkpoint at
    step 2; that checkpoint resumed on one process (CP=1, Muon state restored) gives steps 3-4."""
    cp2 = trained / "stage4_cp2"
    result = run_joyai("pretrain", STAGE4, _stage4_overrides(cp2, trained), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "layout tp=1 pp=1 cp=2" in result.stdout
    expected = {m["step"]: m for m in read_metrics(cp2 / "logs")}
    assert sorted(expected) == [1, 2, 3, 4]

    cp1 = trained / "stage4_cp1"
    shutil.copytree(cp2 / "ckpt" / "iter_0000002", cp1 / "ckpt" / "iter_0000002")
    (cp1 / "ckpt" / TRACKER).write_text("2")
    result = run_joyai("pretrain", STAGE4, [*_stage4_overrides(cp1, trained), "parallel.cp=1"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cp=1" in result.stdout and "resumed from" in result.stdout
    got = {m["step"]: m for m in read_metrics(cp1 / "logs")}
    assert sorted(got) == [3, 4]
    # Step 3 continues from the same weights and Muon momentum: fp32 rounding (1e-5); step 4
    # follows one more update (5e-5, as the other layout tests).
    for step, tol in ((3, 1e-5), (4, 5e-5)):
        for key in ("lm_loss", "mtp_loss"):
            assert abs(got[step][key] - expected[step][key]) <= tol, (
                step,
                key,
                got[step][key],
                expected[step][key],
            )
        assert got[step]["grad_norm"] == pytest.approx(expected[step]["grad_norm"], rel=1e-4)
