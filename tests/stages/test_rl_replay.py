"""MoE routing replay in the rl stage: under activation recompute (R2) on CPU.

The unit test drives two tiny Megatron models with identical weights through the stage's
``RoutingReplay``; the trainer test runs the whole stage twice.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rl_fixtures import rl_test_data, train_rl, write_rl_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rl_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return rl_test_data(tmp_path_factory.mktemp("rl_data"))


@pytest.fixture
def shutdown():
    yield
    from joyai_megatron.training.distributed import shutdown as close

    close()


def _tiny_moe(recompute: str):
    """The tiny arch (layer 0 dense, two MoE layers) with routing replay, seeded identically."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from joyai_megatron.config.schema import ModelCfg, ParallelCfg, PrecisionCfg
    from joyai_megatron.model.build import build_joyai_model
    from joyai_megatron.model.config import build_transformer_config
    from joyai_megatron.model.presets import TINY

    arch = TINY.replace(vocab_size=512)
    config = build_transformer_config(
        arch,
        ModelCfg(backend="local", mtp_enabled=False, recompute=recompute),
        ParallelCfg(),
        PrecisionCfg(dtype="fp32"),
    )
    config.moe_enable_routing_replay = True
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    return build_joyai_model(config, arch, "local")


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_recompute_replays_each_micro_batchs_routing(shutdown):
    """Full recompute + replay gives the loss and gradients of no recompute, also with two
    micro-batches in flight (the pipeline case: F0 F1 B0 B1, each recompute must pop its own
    micro-batch's routing); without switching to REPLAY_BACKWARD after the forward it does not."""
    from megatron.core.transformer.moe.router import TopKRouter

    from joyai_megatron.convert.megatron_model import init_single_process
    from joyai_megatron.rl.replay import RoutingReplay, replay_handles

    init_single_process()
    plain, recomputed, unswitched = _tiny_moe("none"), _tiny_moe("full"), _tiny_moe("full")
    recomputed.load_state_dict(plain.state_dict())
    unswitched.load_state_dict(plain.state_dict())
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(3, 512, (2, 24), generator=gen) for _ in range(2)]
    positions = torch.arange(24).expand(2, 24)

    replay = RoutingReplay()  # record with the "old" weights (eval mode, as the stage does)
    plain.eval()
    with torch.no_grad():
        for mb, ids in enumerate(batches):
            RoutingReplay.record(plain)
            plain(ids, positions, None)
            replay.collect(mb, 0, plain)
    free = []
    with torch.no_grad():  # an "update": most tokens would now pick other experts
        for model in (plain, recomputed, unswitched):
            for router in (m for m in model.modules() if isinstance(m, TopKRouter)):
                router.weight.add_(
                    torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(5))
                )
        RoutingReplay.record(plain)
        plain(batches[0], positions, None)
        free = [h.get_recorded_indices().sort(-1).values for h in replay_handles(plain)]
    recorded = [t.sort(-1).values for t in replay.routes[(0, 0)]]
    changed = sum(int((a != b).any(-1).sum()) for a, b in zip(free, recorded, strict=True))
    assert changed > 10, "the perturbation must change the free routing, or replay is not tested"

    def loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return model(ids, positions, None).float().logsumexp(-1).mean()

    for model in (plain, recomputed, unswitched):
        model.train()
        RoutingReplay.reset(model)
    expected = []
    for mb, ids in enumerate(batches):  # no recompute, one micro-batch at a time
        replay.replay(mb, 0, plain)
        value = loss(plain, ids)
        value.backward()
        expected.append(float(value))
    for model, switch in ((recomputed, True), (unswitched, False)):
        pending = []
        for mb, ids in enumerate(batches):  # both forwards first, then both backwards
            replay.replay(mb, 0, model)
            pending.append(loss(model, ids))
            if switch:
                RoutingReplay.after_forward(model)
        for value in pending:
            value.backward()
        assert [float(v) for v in pending] == expected
    want = _grads(plain)
    got = _grads(recomputed)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=name)
    assert all(not h.replay_backward_list for h in replay_handles(recomputed))  # one pop per recompute
    wrong = _grads(unswitched)
    assert max(float((wrong[n] - want[n]).abs().max()) for n in want) > 1e-5


def test_r2_with_full_recompute_equals_no_recompute(rl_data, tmp_path, shutdown):
    """The stage end to end: two steps of one rollout (the second off-policy) with R2 replay, with
    and without full recompute: same metrics, same weights."""
    from joyai_megatron.rl.reference import snapshot
    from joyai_megatron.training.distributed import shutdown as close

    tokenizer, prompts = rl_data
    runs = {}
    for recompute in ("none", "full"):
        recipe = write_rl_recipe(
            tmp_path / recompute,
            tokenizer,
            prompts,
            train={"train_iters": 2},
            rl={"routing_replay": True, "eval_interval": 0, "tis_clip": 2.0},
            model={"recompute": recompute},
        )
        trainer, result, _ = train_rl(recipe)
        assert trainer.config.recompute_granularity == (None if recompute == "none" else "full")
        runs[recompute] = (result["history"], snapshot(trainer.model))
        close()
    (plain, plain_w), (full, full_w) = runs["none"], runs["full"]
    assert [h["step"] for h in full] == [1, 2]
    for mine, ref in zip(full, plain, strict=True):
        for key in ("policy_loss", "grad_norm", "stage/ratio_max", "stage/entropy"):
            assert mine[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-7), key
    assert full[1]["stage/ratio_max"] != 1.0  # the second step is off-policy: replay mattered
    for name, tensor in plain_w.items():
        torch.testing.assert_close(full_w[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
