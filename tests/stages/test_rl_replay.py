"""MoE routing replay in the rl stage on CPU: under activation recompute, and R3 (the rollout
engine's routing replayed in the trainer).

Unit tests drive tiny Megatron models (and the local HF engine) through the stage's
``RoutingReplay``; the stage tests run the whole RL loop in this process.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.stages.rl_fixtures import train_rl, write_rl_recipe

pytestmark = pytest.mark.slow


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

    from joyai_megatron.rl.replay import RoutingReplay, replay_handles
    from joyai_megatron.training.checkpoint_model import init_single_process

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

    runs = {}
    for recompute in ("none", "full"):
        recipe = write_rl_recipe(
            tmp_path / recompute,
            rl_data,
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


def _routing_maps(model: torch.nn.Module, sink: list) -> list:
    """Forward hooks on the Megatron routers: (router, input, routing_map) of every call."""
    from megatron.core.transformer.moe.router import TopKRouter

    def hook(router, args, output):
        sink.append((router, args[0].detach(), output[1].detach()))

    return [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, TopKRouter)]


def _free_topk(router, hidden: torch.Tensor) -> torch.Tensor:
    """What the router would pick on its own (sigmoid scores + expert bias, top-k), [tokens, k]."""
    logits = hidden.reshape(-1, hidden.shape[-1]).float() @ router.weight.float().t()
    scores = logits.sigmoid() + router.expert_bias.float()
    return scores.topk(router.topk, dim=-1).indices.sort(-1).values


def test_engine_routing_aligns_with_the_trainer_and_is_replayed(shutdown):
    """The local engine's recorded routing, laid out as the stage's micro-batch, is (1) what the
    trainer's own routers pick at those positions on the same weights (the alignment), (2) what
    the routers use under replay (probed in the router's output), and (3) gives the engine's
    log-probs to fp32 rounding; the same routing shifted by one token does not."""
    from joyai_megatron.model.presets import TINY
    from joyai_megatron.rl.batch import Trajectory, micro_batches
    from joyai_megatron.rl.logprobs import token_logprobs
    from joyai_megatron.rl.replay import RoutingReplay, moe_ordinals, rollout_targets
    from joyai_megatron.rl.rollout import SamplingParams
    from joyai_megatron.rl.rollout.local import LocalHFEngine
    from joyai_megatron.rl.rollout.weight_sync import full_model_hf_weights
    from joyai_megatron.training.checkpoint_model import init_single_process
    from joyai_megatron.training.packing import pack_batch

    init_single_process()
    arch = TINY.replace(vocab_size=512)
    model = _tiny_moe("none").eval()
    engine = LocalHFEngine(arch)
    engine.update_weights(full_model_hf_weights([model], arch, include_mtp=False))
    prompts = [[5, 17, 42, 9], [7, 300, 11, 12, 13, 99, 4]]  # unequal: the engine left-pads
    params = SamplingParams(max_new_tokens=6, temperature=1.0, stop_token_ids=(1,), pad_token_id=2)
    gens = engine.generate(prompts, 3, params, seed=3, record_routing=True)
    trajs = []
    for g, (prompt, samples) in enumerate(zip(prompts, gens, strict=True)):
        for s in samples:
            assert s.routed_experts.shape == (len(prompt) + len(s.token_ids) - 1, 2, arch.moe_router_topk)
            trajs.append(
                Trajectory(prompt, s.token_ids, s.logprobs, 0.0, g, 0, routed_experts=s.routed_experts)
            )
    (batch,) = micro_batches(trajs, 1, len(trajs), 16, pad_id=2, first_index=0)
    routes = batch["routed_experts"]
    covered = routes[:, 0, 0] >= 0
    assert int(covered.sum()) == sum(len(t.prompt_ids) + len(t.response_ids) - 1 for t in trajs)
    packed = pack_batch(batch["tokens"], batch["labels"], batch["loss_mask"], batch["position_ids"])
    ordinals = moe_ordinals(model, list(arch.moe_layer_freq))
    assert ordinals == [0, 1]

    def forward(targets: list[torch.Tensor] | None) -> tuple[torch.Tensor, list]:
        calls: list = []
        hooks = _routing_maps(model, calls)
        if targets is None:
            RoutingReplay.release(model)
        else:
            RoutingReplay.set_targets(model, targets)
        with torch.no_grad():
            logits = model(
                packed.tokens, packed.position_ids, None, packed_seq_params=packed.packed_seq_params
            )
        for h in hooks:
            h.remove()
        RoutingReplay.release(model)
        return token_logprobs(logits, packed.labels, 1.0).view(batch["tokens"].shape), calls

    mask = batch["loss_mask"].bool()
    engine_lp = batch["rollout_logprobs"]
    free_lp, free_calls = forward(None)
    for (router, hidden, _), o in zip(free_calls, ordinals, strict=True):  # (1) alignment
        agree = (_free_topk(router, hidden)[covered] == routes[covered, o].long().sort(-1).values).all(-1)
        assert float(agree.float().mean()) >= 0.99, float(agree.float().mean())
    targets = rollout_targets(routes, ordinals, arch.num_experts)
    replay_lp, calls = forward(targets)
    for (_, _, routing_map), o, target in zip(calls, ordinals, targets, strict=True):  # (2) probe
        used = routing_map.nonzero()[:, 1].view(-1, arch.moe_router_topk)  # expert ids per token, sorted
        assert torch.equal(used[covered], routes[covered, o].long().sort(-1).values)
        assert torch.equal(used, target.sort(-1).values)  # unset tokens: the round-robin filler
    assert float((replay_lp - engine_lp)[mask].abs().max()) < 1e-5  # (3) the engine's log-probs
    assert float((free_lp - engine_lp)[mask].abs().max()) < 1e-5
    shifted = rollout_targets(routes.roll(1, dims=0), ordinals, arch.num_experts)
    wrong_lp, _ = forward(shifted)
    assert float((wrong_lp - engine_lp)[mask].abs().max()) > 1e-4


def test_r3_stage_replays_the_engine_routing_and_trains(rl_data, tmp_path, shutdown):
    """Two FiberPO steps with rl.routing_replay=r3 (engine in its child process, full recompute):
    in every trainer forward, recomputes included, each router uses the engine's experts at every
    token the engine routed; old log-probs equal the engine's; the loss is finite; weights move."""
    from joyai_megatron.config.recipe import load_recipe
    from joyai_megatron.rl.reference import snapshot
    from joyai_megatron.rl.replay import moe_ordinals, routers
    from joyai_megatron.stages.rl import RLStage
    from joyai_megatron.training.trainer import Trainer

    recipe = write_rl_recipe(
        tmp_path,
        rl_data,
        train={"train_iters": 2},
        rl={"routing_replay": "r3", "eval_interval": 0, "tis_clip": 2.0},
        model={"recompute": "full"},
    )

    trainer = Trainer(load_recipe(str(recipe)), RLStage)
    before = snapshot(trainer.model)
    stage, chunk = trainer.stage, trainer.model[0]
    ordinal = dict(
        zip(map(id, routers(chunk)), moe_ordinals(chunk, list(trainer.arch.moe_layer_freq)), strict=True)
    )
    calls: list = []  # router calls since the current micro-batch's forward (its recompute included)
    hooks = _routing_maps(chunk, calls)
    current: dict = {}
    checked = {"train": 0, "old": 0}

    def check() -> None:
        routes = current["batch"]["routed_experts"]
        covered = routes[:, 0, 0] >= 0
        for router, _, routing_map in calls:
            used = routing_map.nonzero()[:, 1].view(-1, router.topk)
            want = routes[covered, ordinal[id(router)]].long().sort(-1).values
            assert torch.equal(used[covered], want), current["mode"]
        checked[current["mode"]] += len(calls)
        calls.clear()

    original = stage.forward_step

    def forward_step(data_iterator, model):  # PP=1: a micro-batch's backward precedes the next
        if calls:
            check()
        batch = next(data_iterator)
        current.update(batch=batch, mode=stage.mode)
        return original(iter([batch]), model)

    stage.forward_step = forward_step
    result = trainer.train()
    if calls:
        check()
    for h in hooks:
        h.remove()
    history = result["history"]
    # Forward and recompute calls of every update micro-batch, and the old-log-prob pass's.
    assert checked["train"] >= 2 * 2 * len(ordinal) and checked["old"] >= len(ordinal)
    assert history[0]["stage/mismatch/logprob_abs_max"] < 1e-5
    assert history[0]["stage/ratio_max"] == pytest.approx(1.0, abs=1e-6)
    assert all(math.isfinite(h["policy_loss"]) and math.isfinite(h["grad_norm"]) for h in history)
    after = snapshot(trainer.model)
    assert any(not torch.equal(before[k], after[k]) for k in before), "weights did not change"


def test_r3_needs_an_engine_that_records_routing(rl_data, tmp_path):
    from joyai_megatron.config.recipe import load_recipe
    from joyai_megatron.rl.recipe_checks import check_rl_recipe

    path = write_rl_recipe(tmp_path, rl_data)
    for backend in ("vllm", "sglang"):
        with pytest.raises(ValueError, match="enable_return_routed_experts"):
            check_rl_recipe(load_recipe(str(path), ["rl.routing_replay=r3", f"rl.rollout_backend={backend}"]))
    with pytest.raises(ValueError, match=r"rl.routing_replay must be one of none\|r2\|r3"):
        check_rl_recipe(load_recipe(str(path), ["rl.routing_replay=r4"]))
    check_rl_recipe(load_recipe(str(path), ["rl.routing_replay=r3"]))  # local: fine


def test_replay_refuses_the_fused_router(rl_data, tmp_path):
    """TE's fused top-k router bypasses RouterReplay: replay with it would silently not replay."""
    from joyai_megatron.config.recipe import load_recipe
    from joyai_megatron.rl.recipe_checks import check_rl_recipe

    path = write_rl_recipe(tmp_path, rl_data)
    for mode in ("r2", "r3"):
        with pytest.raises(ValueError, match=f"rl.routing_replay={mode} with model.moe_router_fusion=true"):
            check_rl_recipe(load_recipe(str(path), [f"rl.routing_replay={mode}", "model.moe_router_fusion=true"]))
    check_rl_recipe(load_recipe(str(path), ["rl.routing_replay=none", "model.moe_router_fusion=true"]))
