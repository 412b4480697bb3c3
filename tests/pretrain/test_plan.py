"""``python -m joyai_megatron plan``: analytic parameter counts against the built model, the
stage split, the memory terms against independent computations, and the command's verdicts."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from joyai_megatron import cli
from joyai_megatron.config.recipe import load_recipe
from joyai_megatron.model.count import build_on_meta, count_model
from joyai_megatron.model.presets import PRESETS, TINY, arch_from_dict, recipe_arch
from joyai_megatron.stages.pretrain import packed_token_losses
from joyai_megatron.training import plan
from joyai_megatron.training.distributed import init_distributed
from joyai_megatron.training.layout import validate_layout
from tests.foundation.foundation_helpers import load_tiny
from tests.joyai_helpers import REPO, run_cli, saved_activation_bytes

STAGE1 = "recipes/pretrain/joyai_48b_a3b/stage1.yaml"
STAGE3 = "recipes/pretrain/joyai_48b_a3b/stage3.yaml"


@pytest.mark.parametrize("preset", list(PRESETS))
def test_analytic_counts_equal_the_built_model(preset: str, single_process: None) -> None:
    arch = PRESETS[preset]
    init_distributed()
    measured = count_model(arch, seq_length=128)
    analytic = plan.model_param_counts(arch)
    assert analytic["total_params"] == measured.total_params
    assert analytic["mtp_params"] == measured.mtp_params
    assert analytic["embedding_params"] == measured.embedding_params
    assert analytic["output_params"] == measured.output_params


def test_muon_adam_split_matches_the_built_model(single_process: None, tmp_path: Path) -> None:
    """Params.matrix (Muon) / Params.other (AdamW) against the built model's 2-D rule."""
    init_distributed()
    model = build_on_meta(TINY)
    matrix = other = 0
    for name, p in model.named_parameters():
        if p.ndim == 2 and not name.startswith(("embedding.", "output_layer.")):
            matrix += p.numel()
        else:
            other += p.numel()
    chunk = plan.Chunk(layers=list(range(TINY.num_layers)), embedding=True, loss=True, mtp=1)
    recipe = load_tiny(tmp_path, "model.mtp_enabled=true")
    dense, expert = plan.chunk_params(TINY, chunk, validate_layout(recipe, TINY, 1))
    assert dense.matrix + expert.matrix == matrix
    assert dense.other + expert.other == other


def _layout(path: str, world: int, *overrides: str):
    recipe = load_recipe(REPO / path, list(overrides))
    arch = recipe_arch(recipe)
    return recipe, arch, validate_layout(recipe, arch, world)


@pytest.mark.parametrize(("path", "mtp"), [(STAGE1, False), (STAGE3, True)])
def test_stages_partition_the_model(path: str, mtp: bool) -> None:
    """Across pipeline stages (experts times EP), every parameter is held exactly once; with MTP
    the last stage also holds the embedding copy MTP reads."""
    recipe, arch, layout = _layout(path, 256)
    grid = plan.pipeline_chunks(recipe, arch)
    assert [c.layers for c in grid[0]] == [list(range(0, 21))]
    assert [c.layers for c in grid[1]] == [list(range(21, 40))]
    assert grid[0][0].embedding and grid[1][-1].loss and grid[1][-1].mtp == int(mtp)
    total = 0.0
    for chunks in grid:
        for chunk in chunks:
            dense, expert = plan.chunk_params(arch, chunk, layout)
            total += dense.total + expert.total * layout.ep * layout.etp
    counts = plan.model_param_counts(arch)
    expected = counts["total_params"] + (counts["mtp_params"] + counts["embedding_params"] if mtp else 0)
    assert total == pytest.approx(expected, rel=1e-12)


def test_even_split_without_a_layout(tmp_path: Path) -> None:
    """Without pp_layout: equal chunks, virtual stages interleaved, embedding first, head last."""
    recipe = load_tiny(tmp_path, "model.arch.num_layers=4", "parallel.pp=2", "parallel.vpp=2")
    arch = arch_from_dict({"preset": "tiny", "num_layers": 4})
    grid = plan.pipeline_chunks(recipe, arch)
    assert [[c.layers for c in chunks] for chunks in grid] == [[[0], [2]], [[1], [3]]]
    assert grid[0][0].embedding and grid[1][1].loss and not grid[0][1].embedding


def test_in_flight_micro_batches() -> None:
    assert [plan.in_flight(4, 1, r, 100) for r in range(4)] == [4, 3, 2, 1]
    assert plan.in_flight(4, 1, 0, 2) == 2  # fewer micro-batches than stages
    assert plan.in_flight(1, 1, 0, 100) == 1
    # Interleaved, pp=4, v=2, rank 0: warm-up (4-0-1)*2 + (2-1)*4 = 10 chunk-micro-batches, +1.
    assert plan.in_flight(4, 2, 0, 100) == pytest.approx(11 / 2)


def test_memory_terms_for_the_48b_stage1_layout() -> None:
    recipe, arch, layout = _layout(STAGE1, 256)
    stages = plan.estimate(recipe, arch, layout)
    first, last = stages
    # Stage 0: embedding + dense layer 0 + 20 MoE layers with 32 of 256 experts each (EP=8).
    h, v = arch.hidden_size, arch.vocab_size
    attn = plan.attention_params(arch).total
    dense = v * h + 21 * attn + plan.dense_mlp_params(arch).total + 20 * plan.moe_shared_params(arch).total
    experts = 20 * 32 * 3 * h * arch.moe_ffn_hidden_size
    assert first.params == pytest.approx(dense + experts, rel=1e-12)
    assert first.weights == pytest.approx(2 * first.params)  # bf16
    assert first.grads == pytest.approx(4 * first.params)  # fp32 main grads
    assert first.in_flight == 2 and last.in_flight == 1  # 1F1B with pp=2
    # Optimizer: (fp32 master + momentum) for matrices, (master + 2 moments) for the rest, over
    # DP=128 (dense) and expert-DP=16, plus at most one whole tensor (the embedding) per rank.
    matrices = dense - v * h - 21 * (h + arch.q_lora_rank + arch.kv_lora_rank) - 21 * h
    vectors = dense - matrices
    sharded = (8 * matrices + 12 * vectors) / 128 + 8 * experts / 16
    assert sharded < first.optimizer <= sharded + 12 * v * h + 12 * 2 * h * arch.moe_ffn_hidden_size
    # More pipeline stages hold fewer micro-batches' worth of layers each: stage 0 stays the peak.
    assert first.total > last.total


def test_recompute_and_micro_batch_move_activations_the_right_way() -> None:
    def activations(*overrides: str) -> float:
        recipe, arch, layout = _layout(STAGE1, 256, *overrides)
        return plan.estimate(recipe, arch, layout)[0].activations

    selective = activations()
    assert activations("model.recompute=none") > selective > activations("model.recompute=full")
    # Saved activations scale with tokens per micro-batch (the working set is added once).
    recipe, arch, layout = _layout(STAGE1, 256)
    s = plan.ActivationSetting(
        4096, 2, 1, 1, False, "selective", frozenset(recipe.model.recompute_modules), False
    )
    s2 = plan.ActivationSetting(
        8192, 2, 1, 1, False, "selective", frozenset(recipe.model.recompute_modules), False
    )
    chunk = plan.pipeline_chunks(recipe, arch)[0][0]
    assert plan.chunk_activation(arch, chunk, s2, 1)[0] == pytest.approx(
        2 * plan.chunk_activation(arch, chunk, s, 1)[0]
    )


def test_activation_estimate_is_near_the_measured_saved_tensors(single_process: None) -> None:
    """Sum the bytes autograd really keeps for one forward of the tiny model (local backend, fp32,
    no recompute) and compare.  The estimate models fused TE kernels; eager PyTorch norms and the
    SDPA padding of v keep somewhat more, so the estimate may sit below the measurement."""
    from megatron.core import parallel_state

    from joyai_megatron.config.schema import ModelCfg, ParallelCfg, PrecisionCfg
    from joyai_megatron.model.build import build_joyai_model
    from joyai_megatron.model.config import build_transformer_config
    from joyai_megatron.training.distributed import init_distributed, set_seed
    from joyai_megatron.training.packing import pack_batch

    init_distributed()
    parallel_state.initialize_model_parallel()
    set_seed(3)
    arch = TINY.replace(vocab_size=512)
    config = build_transformer_config(
        arch, ModelCfg(backend="local", mtp_enabled=True), ParallelCfg(), PrecisionCfg()
    )
    model = build_joyai_model(config, arch, "local")
    tokens = torch.randint(0, arch.vocab_size, (1, 256))
    packed = pack_batch(tokens, torch.roll(tokens, -1, 1), torch.ones(1, 256), torch.arange(256)[None])
    with saved_activation_bytes(model) as saved:
        packed_token_losses(model, packed)
    measured = saved[0]
    setting = plan.ActivationSetting(256, 4, 1, 1, False, "none", frozenset(), True)
    chunk = plan.Chunk(layers=list(range(arch.num_layers)), embedding=True, loss=True, mtp=1)
    estimate, _ = plan.chunk_activation(arch, chunk, setting, 1)
    assert 0.6 * measured < estimate < 1.4 * measured, (estimate, measured)


def _plan_args(*argv: str) -> list[str]:
    return ["plan", *argv]


def test_48b_default_layout_fits_80gb(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(_plan_args(STAGE1, "--nodes", "32", "--gpus-per-node", "8")) == 0
    out = capsys.readouterr().out
    assert "256 ranks" in out and "dp=128 expert-dp=16" in out
    assert "GB per GPU" in out and ": fits" in out
    assert cli.main(_plan_args(STAGE1, "--nodes", "32", "--gpus-per-node", "8", "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] and 20 < report["per_gpu_gb"] <= report["usable_gb"] == 80 - 11
    assert report["most_loaded_stage"] == 0
    worst = report["stages"][0]
    assert worst["total"] == pytest.approx(
        worst["weights"] + worst["grads"] + worst["optimizer"] + worst["activations"], rel=1e-9
    )
    # Step time: FLOPs per token x tokens / (GPUs x MFU x peak).
    step = report["step"]
    tokens = 9216 * 4096
    assert step["tokens_per_step"] == tokens
    assert step["seconds"] == pytest.approx(
        step["flops_per_token"] * tokens / (256 * 0.35 * 989e12), rel=1e-9
    )


@pytest.mark.parametrize(("stage", "cp"), [("stage4_64k", 4), ("stage4_128k", 8)])
def test_stage4_counts_the_context_parallel_attention(stage: str, cp: int) -> None:
    """Stage 4 splits each sequence over CP ranks (training/packing.py): 16,384 tokens per GPU, and
    TE's p2p ring adds to a layer's working set every K/V step it receives (max(cp, 4) copies of
    the rank's K/V) and keeps one received step plus fp32 softmax statistics for backward."""
    recipe, arch, layout = _layout(f"recipes/pretrain/joyai_48b_a3b/{stage}.yaml", 256)
    assert (layout.cp, layout.dp, recipe.parallel.cp_comm_type, recipe.model.backend) == (
        cp,
        256 // (2 * cp),
        "p2p",
        "te",
    )
    tokens = recipe.train.seq_length // cp
    assert tokens == 16384
    s = plan.ActivationSetting(tokens, 2, 1, 1, False, "full", frozenset(), False, cp=cp)
    kv = tokens * arch.num_attention_heads * (192 + 128) * 2  # MLA q/k 192, v 128, bf16
    assert plan.local_kv_bytes(arch, s) == kv
    chunk = plan.pipeline_chunks(recipe, arch)[1][0]  # 19 layers + MTP + head
    with_cp = plan.chunk_activation(arch, chunk, s, 1)
    without = plan.chunk_activation(arch, chunk, dataclasses.replace(s, cp=1), 1)
    assert with_cp[0] == without[0]  # full recompute: only layer inputs are saved
    lse = tokens * arch.num_attention_heads * 4
    assert with_cp[1] - without[1] == pytest.approx(max(cp, 4) * kv + kv + lse, rel=1e-12)


@pytest.mark.parametrize("stage", ["stage2", "stage3", "stage4_64k", "stage4_128k"])
def test_other_48b_stages_fit(stage: str, capsys: pytest.CaptureFixture) -> None:
    path = f"recipes/pretrain/joyai_48b_a3b/{stage}.yaml"
    assert cli.main(_plan_args(path, "--nodes", "32", "--gpus-per-node", "8", "--json")) == 0
    assert json.loads(capsys.readouterr().out)["fits"]


def test_one_gpu_is_refused_by_the_layout() -> None:
    proc = run_cli(*_plan_args(STAGE1, "--nodes", "1", "--gpus-per-node", "1"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "world size 1 is not divisible by tp*pp*cp = 1*2*1 = 2" in proc.stderr
    assert "world size 1 is not divisible by etp*ep*pp = 1*8*2 = 16" in proc.stderr


def test_valid_layout_that_does_not_fit_is_refused(capsys: pytest.CaptureFixture) -> None:
    argv = [
        STAGE1,
        "parallel.pp=1",
        "parallel.ep=1",
        "parallel.pp_layout=null",
        "train.rampup_batch_size=null",
    ]
    assert cli.main(_plan_args(*argv, "--nodes", "1", "--gpus-per-node", "1")) == 1
    captured = capsys.readouterr()
    assert "DOES NOT FIT" in captured.out
    assert "does not fit: pipeline stage 0 needs" in captured.err and "80 GB GPU" in captured.err
    # A bigger card and reserve flag are honoured: still far too small for 49B parameters on one GPU.
    args = argparse.Namespace(
        recipe=STAGE1,
        overrides=argv[1:],
        nodes=1,
        gpus_per_node=1,
        gpu_memory_gb=141,
        json=True,
        reserve_gb=0,
    )
    assert plan.main(args) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["usable_gb"] == 141 and report["per_gpu_gb"] > 600


def test_unknown_override_is_refused(capsys: pytest.CaptureFixture) -> None:
    assert (
        cli.main(
            _plan_args(STAGE1, "parallel.sequence_paralel=true", "--nodes", "32", "--gpus-per-node", "8")
        )
        == 2
    )
    assert "did you mean 'parallel.sequence_parallel'?" in capsys.readouterr().err


def test_tiny_recipe_on_two_cpu_ranks_fits(capsys: pytest.CaptureFixture) -> None:
    """The Slurm launcher's CPU-mode preflight (tests/slurm): micro-batch 1 on 2 ranks."""
    argv = [
        "recipes/pretrain/tiny_cpu/stage1.yaml",
        "train.micro_batch_size=1",
        "--nodes",
        "1",
        "--gpus-per-node",
        "2",
    ]
    assert cli.main(_plan_args(*argv)) == 0
    assert ": fits" in capsys.readouterr().out
