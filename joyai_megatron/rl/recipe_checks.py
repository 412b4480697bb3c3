"""The RL stage's recipe checks, run by ``RLStage.check_recipe`` before any process group or model."""

from __future__ import annotations

from pathlib import Path

from joyai_megatron.config.schema import Recipe
from joyai_megatron.rl.agentic.env import check_agentic_config
from joyai_megatron.rl.objective import check_rl_config
from joyai_megatron.rl.replay import replay_mode
from joyai_megatron.rl.rewards.code_tests import CODE_REWARDS
from joyai_megatron.rl.rewards.sandbox import bubblewrap_available
from joyai_megatron.rl.rewards.sandbox.isolation import SETUP_HINT
from joyai_megatron.training.distributed import read_dist_env


def check_rl_recipe(recipe: Recipe) -> None:
    """Every RL-specific recipe error, raised before process groups or models exist."""
    rl, t, p = recipe.rl, recipe.train, recipe.parallel
    check_rl_config(rl)
    replay = replay_mode(rl.routing_replay)
    if recipe.model.mtp_enabled:
        raise ValueError(
            "model.mtp_enabled must be false for rl: the MTP block is not trained on rollouts "
            "(with no labels Megatron-Core would train it on every token); see docs/rl.md"
        )
    if p.cp != 1:
        raise ValueError("parallel.cp must be 1 for rl: FiberPO's trajectory sums would need a CP all-reduce")
    if t.eval_interval:
        raise ValueError("train.eval_interval must be 0 for rl; use rl.eval_interval with rl.eval_path")
    if replay == "r3" and rl.rollout_backend != "local":
        raise ValueError(
            f"rl.routing_replay=r3 replays the experts the rollout engine routed each token to, and "
            f"only the local engine records them here. rollout_backend={rl.rollout_backend} would need "
            "rl/rollout/engines.py to request and read them: vLLM with the engine argument "
            "enable_return_routed_experts=True (CompletionOutput.routed_experts, [tokens, layers, "
            "top_k]), SGLang with enable_return_routed_experts and generate(return_routed_experts=True) "
            "(meta_info['routed_experts']), laid out as Sample.routed_experts. Use rl.routing_replay=r2"
        )
    if replay != "none" and recipe.model.moe_router_fusion:
        raise ValueError(
            f"rl.routing_replay={replay} with model.moe_router_fusion=true: Transformer Engine's fused "
            "router never consults Megatron-Core's RouterReplay (moe_utils.topk_routing_with_score_function "
            "returns before it), so the replayed experts would be silently ignored; set "
            "model.moe_router_fusion=false"
        )
    if rl.kl_coef > 0 and not recipe.checkpoint.load:
        raise ValueError("rl.kl_coef > 0 needs checkpoint.load: the reference policy is that checkpoint")
    for key, value in (("data.rl_path", recipe.data.rl_path), ("data.tokenizer", recipe.data.tokenizer)):
        if not value:
            raise ValueError(f"{key} must be set for rl")
    if not Path(recipe.data.rl_path).is_file():
        raise FileNotFoundError(
            f"data.rl_path: {recipe.data.rl_path} does not exist (python -m data_prep rl)"
        )
    if rl.reward in CODE_REWARDS and not rl.unsafe_code_execution and not bubblewrap_available():
        raise ValueError(
            f"rl.reward={rl.reward} runs model-written code, and no sandbox is available: {SETUP_HINT}"
        )
    if rl.eval_interval and not rl.eval_path:
        raise ValueError("rl.eval_interval > 0 needs rl.eval_path")
    if rl.agentic.enabled:
        check_agentic_config(rl)
    samples = rl.prompts_per_step * rl.group_size
    if rl.steps_per_rollout < 1 or samples % rl.steps_per_rollout:
        raise ValueError(
            f"rl.steps_per_rollout={rl.steps_per_rollout} must divide prompts_per_step * group_size = {samples}"
        )
    if t.global_batch_size != samples // rl.steps_per_rollout:
        raise ValueError(
            f"train.global_batch_size must be rl.prompts_per_step * rl.group_size / rl.steps_per_rollout "
            f"= {samples // rl.steps_per_rollout} trajectories, got {t.global_batch_size}"
        )
    if t.rampup_batch_size:
        raise ValueError("train.rampup_batch_size is not supported for rl")
    dp = read_dist_env().world_size // (p.tp * p.pp * p.cp)
    if dp and rl.prompts_per_step % dp:
        raise ValueError(
            f"rl.prompts_per_step={rl.prompts_per_step} must divide over {dp} data-parallel ranks"
        )
