"""Rollouts for the ``rl`` stage: prompt choice, generation, rewards, weight sync, async overlap.

One rank per model-parallel group (TP x PP) generates for its data-parallel replica with the
engine and broadcasts the scored trajectories to its peers; every rank joins the weight gather.
Rollout r uses prompts ``PromptSampler.indices(r)``, split contiguously over data-parallel ranks
(whole prompt groups per rank), and a sampling seed derived from (train.seed, r, dp rank): the
rollouts are a function of the weights and r, which is what makes resume exact.

Synchronous mode syncs the weights after each optimizer step and generates rollout r on the spot.
Asynchronous mode generates rollout r + 1 on a background thread with the weights synced just
after rollout r was collected, so training on r overlaps generating r + 1 (one rollout stale:
rollout r is sampled from the policy before the previous rollout's updates; the old log-probs are
recomputed by the trainer, and ``rl.tis_clip`` corrects the remaining mismatch).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch.distributed as dist
from megatron.core import parallel_state

from joyai_megatron.config.schema import Recipe
from joyai_megatron.model.presets import ModelArch
from joyai_megatron.rl.batch import RolloutStats, Trajectory, assign_advantages, score
from joyai_megatron.rl.prompts import Prompt, PromptSampler
from joyai_megatron.rl.replay import replay_mode
from joyai_megatron.rl.rewards.pool import score_all
from joyai_megatron.rl.rollout import SamplingParams, build_engine
from joyai_megatron.rl.rollout.async_worker import BackgroundTask
from joyai_megatron.rl.rollout.weight_sync import full_model_hf_weights
from joyai_megatron.training.tokenizer import HFTokenizer


def rollout_seed(seed: int, rollout: int, dp_rank: int) -> int:
    return int(np.random.SeedSequence([seed, rollout, dp_rank]).generate_state(1)[0])


class RolloutManager:
    def __init__(
        self,
        recipe: Recipe,
        arch: ModelArch,
        tokenizer: HFTokenizer,
        prompts: list[Prompt],
        sampler: PromptSampler,
        total_rollouts: int,
    ) -> None:
        self.recipe, self.rl, self.arch = recipe, recipe.rl, arch
        self.tokenizer, self.prompts, self.sampler = tokenizer, prompts, sampler
        self.total_rollouts = total_rollouts
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.mp_group = parallel_state.get_model_parallel_group()
        self.is_generator = dist.get_rank(self.mp_group) == 0
        self.mp_src = dist.get_global_rank(self.mp_group, 0)
        stop = {tokenizer.eod} | {i for i in [tokenizer.token_to_id("<|im_end|>")] if i is not None}
        self.stop_ids = tuple(sorted(stop))
        self.params = SamplingParams(
            self.rl.max_new_tokens, self.rl.temperature, self.rl.top_p, self.stop_ids, tokenizer.pad
        )
        self.domains = {d: i for i, d in enumerate(sorted({p.domain for p in prompts}))}
        self.engine = (
            build_engine(self.rl.rollout_backend, arch, dict(self.rl.rollout_args), recipe.precision.dtype)
            if self.is_generator
            else None
        )
        self.record_routing = replay_mode(self.rl.routing_replay) == "r3"
        if self.record_routing and self.engine is not None and not self.engine.records_routing:
            raise ValueError(f"rl.routing_replay=r3: the {self.engine.name} engine cannot record its routing")
        self.pending: tuple[int, BackgroundTask] | None = None
        self.restored: dict[int, list[Trajectory]] = {}
        self.timings: dict[str, float] = {}
        self.synced_at: int | None = None  # trainer iteration whose weights the engine holds

    # --- weights ----------------------------------------------------------------------------------
    def sync(self, model: list, iteration: int) -> None:
        """Collective: every rank joins the gather; the generator loads the tensors."""
        if self.synced_at == iteration:
            return
        self.synced_at = iteration
        start = time.perf_counter()
        stream = full_model_hf_weights(model, self.arch, include_mtp=False)
        if self.engine is not None:
            self.engine.update_weights(stream)
        else:
            for _ in stream:  # peers take part in the tensor-parallel gathers only
                pass
        self.timings["weight_sync_s"] = time.perf_counter() - start

    # --- generation -------------------------------------------------------------------------------
    def _rank_prompts(self, rollout: int) -> tuple[list[Prompt], list[int]]:
        indices = self.sampler.indices(rollout)
        per_rank = len(indices) // self.dp_size
        start = self.dp_rank * per_rank
        mine = indices[start : start + per_rank]
        return [self.prompts[int(i)] for i in mine], list(range(start, start + per_rank))

    def decode(self, token_ids: list[int]) -> str:
        """The response text a verifier sees: without the stop token that ended it."""
        if token_ids and token_ids[-1] in self.stop_ids:
            token_ids = token_ids[:-1]
        return self.tokenizer.decode(token_ids)

    def reward_fn(self, prompt: Prompt):
        from joyai_megatron.rl.rewards import get_reward

        return get_reward(prompt.verifier if self.rl.reward == "prompt" else self.rl.reward)

    def generate(self, rollout: int) -> list[Trajectory]:
        """This rank's scored trajectories of rollout ``rollout`` (generator rank only)."""
        assert self.engine is not None
        start = time.perf_counter()
        prompts, groups = self._rank_prompts(rollout)
        seed = rollout_seed(self.recipe.train.seed, rollout, self.dp_rank)
        gens = self.engine.generate(
            [p.token_ids for p in prompts],
            self.rl.group_size,
            self.params,
            seed,
            record_routing=self.record_routing,
        )
        trajectories = score(prompts, groups, gens, self.reward_fn, self.decode, self.domains)
        self.timings["generate_s"] = time.perf_counter() - start
        return trajectories

    def collect(self, rollout: int, model: list, iteration: int) -> tuple[list[Trajectory], RolloutStats]:
        """Rollout ``rollout`` for this rank (collective), with advantages and its statistics."""
        wait_start = time.perf_counter()
        trajectories = self.restored.pop(rollout, None)
        if trajectories is None and self.pending is not None and self.pending[0] == rollout:
            trajectories = self.pending[1].result() if self.is_generator else []
            self.pending = None
        if trajectories is None:
            self.sync(model, iteration)
            trajectories = self.generate(rollout) if self.is_generator else []
        elif self.rl.async_rollout:
            self.sync(model, iteration)
        self.timings["rollout_wait_s"] = time.perf_counter() - wait_start
        if self.rl.async_rollout and rollout + 1 < self.total_rollouts and self.is_generator:
            self.pending = (rollout + 1, BackgroundTask(lambda: self.generate(rollout + 1)))
        elif self.rl.async_rollout and rollout + 1 < self.total_rollouts:
            self.pending = (rollout + 1, _NoTask())
        trajectories = self._broadcast(trajectories)
        return assign_advantages(
            trajectories,
            self.rl.group_size,
            scale_by_std=self.rl.normalize_std,
            filter_zero_variance=self.rl.filter_zero_variance,
            stop_token_ids=self.stop_ids,
            turn_penalty=self.turn_penalty(),
        )

    def turn_penalty(self) -> float | None:
        """Per-turn advantages' tool-error penalty (multi-turn managers only)."""
        return None

    def _broadcast(self, trajectories: list[Trajectory]) -> list[Trajectory]:
        if dist.get_world_size(self.mp_group) == 1:
            return trajectories
        box = [trajectories]
        dist.broadcast_object_list(box, src=self.mp_src, group=self.mp_group)
        return box[0]

    # --- state ------------------------------------------------------------------------------------
    def pending_state(self) -> dict[int, list[Trajectory]]:
        """The in-flight rollout, finished (async mode saves it so resume stays exact)."""
        if self.pending is None:
            return {}
        rollout, task = self.pending
        return {rollout: task.result() if self.is_generator else []}

    def restore(self, state: dict[int, list[Trajectory]]) -> None:
        self.restored.update(state)

    def pending_index(self) -> int | None:
        return self.pending[0] if self.pending is not None else None

    # --- evaluation -------------------------------------------------------------------------------
    def evaluate(self, prompts: list[Prompt], model: list, iteration: int) -> dict[str, float]:
        """Greedy pass@1 and mean reward on held-out prompts (collective; waits for async work)."""
        if self.pending is not None and self.is_generator:
            self.restored[self.pending[0]] = self.pending[1].result()
            self.pending = None
        elif self.pending is not None:
            self.restored[self.pending[0]] = []
            self.pending = None
        self.sync(model, iteration)
        per_rank = -(-len(prompts) // self.dp_size)
        mine = prompts[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        totals: dict[str, float] = {}
        if self.is_generator and mine:
            greedy = SamplingParams(self.rl.max_new_tokens, 0.0, 1.0, self.stop_ids, self.tokenizer.pad)
            totals = self.eval_totals(mine, greedy)
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, totals)
        keys = sorted({k for t in out for k in t})
        summed = {k: sum(t.get(k, 0.0) for t in out) for k in keys}
        count = max(summed.pop("count", 0.0), 1.0)
        return {f"eval/{k}": v / count for k, v in summed.items()}

    def eval_totals(self, prompts: list[Prompt], greedy: SamplingParams) -> dict[str, float]:
        """Sums over this rank's held-out prompts (``count`` is the divisor of every other key)."""
        gens = self.engine.generate([p.token_ids for p in prompts], 1, greedy, seed=0)
        jobs = [
            (self.reward_fn(p), self.decode(s.token_ids), p.reference)
            for p, (s,) in zip(prompts, gens, strict=True)
        ]
        rewards = score_all(jobs)
        return {
            "reward": sum(rewards),
            "pass@1": sum(float(r >= 1.0) for r in rewards),
            "count": float(len(rewards)),
        }

    def shutdown(self) -> None:
        if self.pending is not None and self.is_generator:
            self.pending[1].result()
        self.pending = None
        if self.engine is not None:
            self.engine.shutdown()


class _NoTask:
    """Placeholder for ranks that do not generate (their trajectories come by broadcast)."""

    def result(self) -> list[Trajectory]:
        return []
