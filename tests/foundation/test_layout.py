"""Invalid parallel layouts fail in the trainer's constructor, naming the values, before any
process group exists (the ranks of a large job would otherwise die in NCCL set-up)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from joyai_megatron.model.presets import TINY
from joyai_megatron.stages.pretrain import PretrainStage
from joyai_megatron.training.layout import LayoutError, validate_layout
from joyai_megatron.training.trainer import Trainer
from tests.foundation.foundation_helpers import load_tiny

# (case, world size, overrides, fragments the message must contain).  TINY: 4 heads, 8 experts,
# 3 layers, vocab 8192, ffn 128; the tiny recipe has micro-batch 2, global batch 8, sequence 128.
CASES = [
    ("heads_vs_tp", 3, ["parallel.tp=3"], ["num_attention_heads 4 is not divisible by tp 3"]),
    ("experts_vs_ep", 3, ["parallel.ep=3"], ["num_experts 8 is not divisible by ep 3"]),
    ("layers_vs_pp", 2, ["parallel.pp=2"], ["num_layers 3 is not divisible by pp*vpp = 2*1 = 2"]),
    (
        "bad_pp_layout",
        2,
        ["parallel.pp=2", "parallel.pp_layout='Et|tL'"],
        ["parallel.pp_layout 'Et|tL' does not fit pp=2, num_layers=3"],
    ),
    (
        "batch_vs_dp",
        3,
        [],
        ["global_batch_size 8 is not divisible by micro_batch_size*dp = 2*3 = 6"],
    ),
    (
        "sequence_vs_cp",
        2,
        ["parallel.cp=2", "train.seq_length=130"],
        ["seq_length 130 is not divisible by 2*cp = 4"],
    ),
    (
        "te_cp_comm_type_for_mla",
        2,
        ["parallel.cp=2", "model.backend=te", "parallel.cp_comm_type=a2a"],
        ["parallel.cp_comm_type='a2a' with model.backend=te", "only with p2p"],
    ),
    (
        "cp_ep_allgather",
        4,
        ["parallel.cp=2", "parallel.ep=2"],
        ["cp=2 with ep>1 needs model.moe_token_dispatcher=alltoall"],
    ),
    ("sp_without_tp", 1, ["parallel.sequence_parallel=true"], ["sequence_parallel needs tp > 1"]),
    (
        "tp_ep_without_sp",
        4,
        ["parallel.tp=2", "parallel.ep=2"],
        ["tp=2 with ep=2 needs parallel.sequence_parallel=true"],
    ),
    (
        "vocab_vs_tp",
        2,
        ["parallel.tp=2", "model.arch.vocab_size=8191"],
        ["vocab_size 8191 is not divisible by tp 2"],
    ),
    (
        "ramp_vs_dp",
        2,
        ["train.rampup_batch_size=[4,2,30720]"],
        ["ramp increment 2 not divisible by mbs*dp=4"],
    ),
    (
        "world_vs_model_parallel",
        3,
        ["parallel.tp=2"],
        ["world size 3 is not divisible by tp*pp*cp = 2*1*1 = 2"],
    ),
]


@pytest.mark.parametrize(("case", "world", "overrides", "fragments"), CASES, ids=[c[0] for c in CASES])
def test_invalid_layout_fails_before_any_process_group(
    case: str, world: int, overrides: list[str], fragments: list[str], fake_world, tmp_path: Path
) -> None:
    del case
    recipe = load_tiny(tmp_path, *overrides)
    fake_world(world)
    assert not dist.is_initialized()
    with pytest.raises(LayoutError) as err:
        Trainer(recipe, PretrainStage)
    message = str(err.value)
    assert f"world size {world}" in message
    for fragment in fragments:
        assert fragment in message, message
    assert not dist.is_initialized(), "a process group was created before the layout was checked"


def test_every_break_is_reported_at_once(tmp_path: Path) -> None:
    """One run names every rule it breaks, not just the first."""
    recipe = load_tiny(tmp_path, "parallel.tp=3", "parallel.ep=3")
    with pytest.raises(LayoutError) as err:
        validate_layout(recipe, TINY, 9)
    message = str(err.value)
    assert "num_attention_heads 4 is not divisible by tp 3" in message
    assert "num_experts 8 is not divisible by ep 3" in message
    assert "ffn_hidden_size 128 is not divisible by tp 3" in message


def test_valid_layout_gives_the_group_sizes(tmp_path: Path) -> None:
    recipe = load_tiny(
        tmp_path,
        "parallel.tp=2",
        "parallel.ep=4",
        "parallel.sequence_parallel=true",
        "train.global_batch_size=16",
    )
    layout = validate_layout(recipe, TINY, 16)
    # dp = 16 / (tp*pp*cp) = 8; expert dp = 16 / (etp*ep*pp) = 4.
    assert (layout.dp, layout.expert_dp, layout.tp, layout.ep) == (8, 4, 2, 4)


def test_te_backend_without_transformer_engine_is_a_clear_error(fake_world, tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed here")
    recipe = load_tiny(tmp_path, "model.backend=te")
    fake_world(1)
    with pytest.raises(RuntimeError) as err:
        Trainer(recipe, PretrainStage)
    message = str(err.value)
    assert "model.backend=te needs Transformer Engine" in message
    assert "model.backend=local" in message
    assert not dist.is_initialized()


def test_context_parallel_layouts(fake_world, tmp_path: Path) -> None:
    """CP runs on both backends (the local one all-gathers K/V); a stage that does not split its
    batches over CP ranks is refused by name before any process group."""
    from joyai_megatron.stages.rl import RLStage

    layout = validate_layout(load_tiny(tmp_path, "parallel.cp=2"), TINY, 4)
    assert (layout.cp, layout.dp) == (2, 2)
    te = load_tiny(tmp_path, "parallel.cp=2", "model.backend=te", "model.moe_token_dispatcher=alltoall")
    assert validate_layout(te, TINY, 2).cp == 2  # p2p, the default cp_comm_type
    assert validate_layout(load_tiny(tmp_path, "parallel.cp=2", "parallel.ep=2",
                                     "model.moe_token_dispatcher=alltoall"), TINY, 4).ep == 2  # fmt: skip
    fake_world(2)
    with pytest.raises(LayoutError, match="the rl stage does not split its batches over context-parallel"):
        Trainer(load_tiny(tmp_path, "parallel.cp=2"), RLStage)
    assert not dist.is_initialized()
