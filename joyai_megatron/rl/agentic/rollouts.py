"""The rollout manager of agentic RL: the single-turn manager with episodes instead of samples.

Everything around generation (prompt choice, weight sync, async overlap on a background thread,
broadcast to model-parallel peers, pending-rollout state for exact resume, advantages) is
``RolloutManager``'s; only ``generate`` (multi-turn episodes per prompt group) and the evaluation
(greedy episodes) differ.
"""

from __future__ import annotations

import time

from joyai_megatron.rl.agentic.env import EpisodeLimits, tool_environment
from joyai_megatron.rl.agentic.episodes import Episode, run_episodes
from joyai_megatron.rl.batch import Trajectory
from joyai_megatron.rl.prompts import Prompt
from joyai_megatron.rl.rollout import SamplingParams
from joyai_megatron.rl.rollouts import RolloutManager, rollout_seed


class AgenticRolloutManager(RolloutManager):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.rl.agentic
        self.limits = EpisodeLimits(
            cfg.max_turns, cfg.turn_timeout_s, cfg.total_timeout_s, cfg.truncated_reward
        )
        if self.record_routing:
            raise ValueError("rl.agentic: rollout routing replay (r3) is single-turn only; use r2")

    def turn_penalty(self) -> float | None:
        cfg = self.rl.agentic
        if cfg.advantage_level not in ("trajectory", "turn"):
            raise ValueError(
                f"rl.agentic.advantage_level must be trajectory or turn, got {cfg.advantage_level!r}"
            )
        return cfg.tool_error_penalty if cfg.advantage_level == "turn" else None

    def episodes(self, prompts: list[Prompt], n: int, params: SamplingParams, seed: int) -> list[Episode]:
        """``n`` finished episodes per prompt, prompt-major."""
        assert self.engine is not None
        episodes = []
        for prompt in prompts:
            for _ in range(n):
                env = tool_environment(
                    list(prompt.tools or self.rl.agentic.tools), self.reward_fn(prompt), self.limits
                )
                env.reset(prompt)
                episodes.append(Episode(list(prompt.token_ids), env, prompt.enable_thinking))
        return run_episodes(
            self.engine,
            episodes,
            params,
            seed,
            self.limits.max_turns,
            self.recipe.train.seq_length,
            self.tokenizer.encode,
            self.decode,
        )

    def generate(self, rollout: int) -> list[Trajectory]:
        start = time.perf_counter()
        prompts, groups = self._rank_prompts(rollout)
        seed = rollout_seed(self.recipe.train.seed, rollout, self.dp_rank)
        episodes = self.episodes(prompts, self.rl.group_size, self.params, seed)
        n = self.rl.group_size
        out = [
            Trajectory(
                list(e.prompt_ids),
                e.response_ids,
                e.logprobs,
                e.env.reward(),
                groups[i // n],
                self.domains[prompts[i // n].domain],
                response_mask=e.response_mask,
                episode=e.info,
            )
            for i, e in enumerate(episodes)
        ]
        self.timings["generate_s"] = time.perf_counter() - start
        return out

    def eval_totals(self, prompts: list[Prompt], greedy: SamplingParams) -> dict[str, float]:
        episodes = self.episodes(prompts, 1, greedy, seed=0)
        rewards = [e.env.reward() for e in episodes]
        infos = [e.info for e in episodes]
        return {
            "reward": sum(rewards),
            "pass@1": sum(float(r >= 1.0) for r in rewards),
            "tool_use": sum(float(i.tool_calls > 0 and i.tool_errors == 0) for i in infos),
            "turns": float(sum(i.turns for i in infos)),
            "tool_calls": float(sum(i.tool_calls for i in infos)),
            "truncated_frac": sum(float(i.truncated is not None) for i in infos),
            "count": float(len(episodes)),
        }
