"""RL with FiberPO (or GRPO / GSPO / FiberPO-Domain) on the shared trainer.

Per rollout (``before_step``): sync the weights into the rollout engine, generate ``group_size``
samples for each prompt, score them, compute group advantages (dropping zero-variance groups),
then one forward-only pass of the trainer's model recomputes the old log-probs (recording the MoE
routing with ``rl.routing_replay=r2``, replaying the engine's with ``r3``), and, with
``rl.kl_coef`` > 0, a pass with the reference weights swapped in. Each of the
``rl.steps_per_rollout`` optimizer steps then trains on one mini-batch through ``forward_step``:
response-token log-probs from GPTModel's logits (vocab-parallel under TP), the chosen loss,
optional truncated importance sampling against the rollout engine's log-probs. docs/rl.md has the
whole picture.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from megatron.core import parallel_state

from joyai_megatron.rl.agentic.rollouts import AgenticRolloutManager
from joyai_megatron.rl.batch import micro_batches, split_evenly
from joyai_megatron.rl.logprobs import token_entropy, token_logprobs
from joyai_megatron.rl.objective import LossInputs, policy_loss, token_regimes
from joyai_megatron.rl.prompts import PromptSampler, load_prompts, read_pass_rates
from joyai_megatron.rl.recipe_checks import check_rl_recipe
from joyai_megatron.rl.reference import reference_from_checkpoint, snapshot, swapped_weights
from joyai_megatron.rl.replay import RoutingReplay, moe_ordinals, replay_mode, rollout_targets
from joyai_megatron.rl.rewards.sandbox import set_unsafe_code_execution
from joyai_megatron.rl.rollout_state import (
    RolloutProgress,
    load_side_state,
    measure_pass_rates,
    save_side_state,
)
from joyai_megatron.rl.rollouts import RolloutManager
from joyai_megatron.rl.step_metrics import StepMetrics
from joyai_megatron.training.distributed import current_device
from joyai_megatron.training.packing import pack_batch
from joyai_megatron.training.stage import Stage
from joyai_megatron.training.tokenizer import HFTokenizer

# Loss metrics that are means over tokens (the rest are over sequences); maxima are peaks.
TOKEN_METRICS = ("ratio_mean", "weight_mean", "fiber_", "clip_low_frac", "clip_high_frac", "dual_clip_frac")
PEAK_METRICS = ("ratio_max", "seq_ratio_max")


class RLStage(Stage):
    name = "rl"
    uses_mtp_loss = False

    @classmethod
    def check_recipe(cls, recipe: Any) -> None:
        check_rl_recipe(recipe)

    def __init__(self, recipe: Any) -> None:
        super().__init__(recipe)
        set_unsafe_code_execution(recipe.rl.unsafe_code_execution)
        self._saved: dict[str, Any] = {}

    def configure_model(self, config: Any) -> None:
        """Routing replay needs ``moe_enable_routing_replay`` before the routers are built (each
        router then owns a ``RouterReplay``)."""
        config.moe_enable_routing_replay = replay_mode(self.recipe.rl.routing_replay) != "none"

    def build_datasets(self, train_samples: int, valid_samples: int) -> dict[str, Any]:
        """No token datasets: the micro-batches come from each step's rollouts (built in setup)."""
        del train_samples, valid_samples
        return {}

    # --- setup ------------------------------------------------------------------------------------
    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        r, rl = self.recipe, self.recipe.rl
        self.rl, self.arch = rl, trainer.arch
        self.tokenizer = HFTokenizer(r.data.tokenizer)
        self.prompts = load_prompts(r.data.rl_path, self.arch.vocab_size)
        self.eval_prompts = (
            load_prompts(rl.eval_path, self.arch.vocab_size)[: rl.eval_prompts] if rl.eval_path else []
        )
        longest = max(len(p.token_ids) for p in self.prompts + self.eval_prompts)
        if longest + rl.max_new_tokens > r.train.seq_length:
            raise ValueError(
                f"train.seq_length={r.train.seq_length} < longest prompt ({longest} tokens) + rl.max_new_tokens "
                f"({rl.max_new_tokens}); raise train.seq_length"
            )
        self.spr = rl.steps_per_rollout
        self.total_rollouts = -(-trainer.total_iters // self.spr)
        self.metrics = StepMetrics()
        self.mp_rank0 = parallel_state.get_model_parallel_group().rank() == 0
        self.last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        self.tp_rank0 = parallel_state.get_tensor_model_parallel_rank() == 0
        self.chunk_index = {id(c): i for i, c in enumerate(trainer.model)}
        mode = replay_mode(rl.routing_replay)
        self.replay = RoutingReplay(mode) if mode != "none" else None
        if mode == "r3":
            self.moe_ordinals = {
                i: moe_ordinals(chunk, list(self.arch.moe_layer_freq))
                for i, chunk in enumerate(trainer.model)
            }
            tp = parallel_state.get_tensor_model_parallel_world_size()
            self.sp_slice = None
            if r.parallel.sequence_parallel and tp > 1:  # each TP rank routes its sequence part
                part = r.train.micro_batch_size * r.train.seq_length // tp
                rank = parallel_state.get_tensor_model_parallel_rank()
                self.sp_slice = slice(rank * part, (rank + 1) * part)
        self.mode = "train"
        self.progress = RolloutProgress()
        self.pending_eval: dict[str, float] = {}
        self.reference = None
        if rl.kl_coef > 0:
            resumed = trainer.resumed_from and not str(trainer.resumed_from).startswith(
                str(r.checkpoint.load)
            )
            self.reference = (
                reference_from_checkpoint(trainer, r.checkpoint.load) if resumed else snapshot(trainer.model)
            )
        pass_rates = self._saved.get("pass_rates")
        manager_class = AgenticRolloutManager if rl.agentic.enabled else RolloutManager
        self.manager = manager_class(r, self.arch, self.tokenizer, self.prompts, None, self.total_rollouts)  # type: ignore[arg-type]
        if rl.curriculum and pass_rates is None:
            pass_rates = (
                read_pass_rates(rl.pass_rates, self.prompts)
                if rl.pass_rates
                else measure_pass_rates(self.manager, trainer.model, trainer.state.iteration)
            )
        self.pass_rates = pass_rates
        self.manager.sampler = PromptSampler(
            self.prompts,
            rl.prompts_per_step,
            self.total_rollouts,
            r.train.seed,
            pass_rates if rl.curriculum else None,
        )
        side = self._saved.get("side_file")
        if side:
            load_side_state(self.progress, self.replay, self.manager, side)
        if rl.eval_interval and trainer.state.iteration == 0:
            self.pending_eval = self._evaluate()

    def _evaluate(self) -> dict[str, float]:
        it = self.trainer.state.iteration
        out = self.manager.evaluate(self.eval_prompts, self.trainer.model, it)
        return {**out, "eval/at_step": float(it)}

    # --- per step ---------------------------------------------------------------------------------
    def before_step(self, trainer: Any) -> None:
        it = trainer.state.iteration
        rollout = it // self.spr
        if rollout != self.progress.rollout_index:
            self._new_rollout(rollout, it)
        self.step_batches = self.progress.steps[it % self.spr]
        if self.replay is not None:
            for chunk in self.trainer.model:
                RoutingReplay.reset(chunk)  # the step's recompute FIFOs start empty

    def _new_rollout(self, rollout: int, iteration: int) -> None:
        """Generate, score and prepare rollout ``rollout``: old (and reference) log-probs included."""
        import time

        t = self.recipe.train
        kept, stats = self.manager.collect(rollout, self.trainer.model, iteration)
        if self.mp_rank0:
            m = self.metrics
            m.add("reward", stats.reward, stats.samples)
            m.add("pass@1", stats.solved, stats.samples)
            m.add("response_length", stats.response_tokens, stats.samples)
            m.add("stop_frac", stats.stopped, stats.samples)
            m.add("filtered_frac", stats.groups - stats.groups_kept, stats.groups)
            if stats.episodes:  # multi-turn episodes (rl.agentic)
                m.add("turns_per_episode", stats.turns, stats.episodes)
                m.add("tool_calls_per_episode", stats.tool_calls, stats.episodes)
                m.add("tool_error_rate", stats.tool_errors, stats.tool_calls)
                m.add("truncated_frac", stats.truncated, stats.episodes)
                m.add("tool_use_frac", stats.clean_tool_use, stats.episodes)
            for key, value in self.manager.sampler.metrics(rollout).items():
                m.add(f"curriculum/{key}", value, 1.0)
        for key, value in self.manager.timings.items():
            self.metrics.peak(f"time/{key}", value)
        num_mb = t.global_batch_size // (t.micro_batch_size * parallel_state.get_data_parallel_world_size())
        parts = split_evenly(kept, self.spr)
        steps = [
            micro_batches(part, num_mb, t.micro_batch_size, t.seq_length, self.tokenizer.pad, i * num_mb)
            for i, part in enumerate(parts)
        ]
        counts = torch.tensor([float(len(part)) for part in parts])
        if torch.cuda.is_available():
            counts = counts.cuda()  # gpu-only
        torch.distributed.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        empty = {i for i, c in enumerate(counts.tolist()) if c == 0}
        self.progress = RolloutProgress(rollout, steps, empty_steps=empty)  # old/ref log-probs: below
        start = time.perf_counter()
        everything = [mb for step in steps for mb in step]
        if self.replay is not None:
            self.replay.clear()
        self._forward_only(everything, "old")
        if self.reference is not None:
            with swapped_weights(self.trainer.model, self.reference):
                self._forward_only(everything, "ref")
        self.metrics.peak("time/old_logprob_s", time.perf_counter() - start)
        self._mismatch_metrics(everything)

    def _forward_only(self, batches: list[dict[str, torch.Tensor]], mode: str) -> None:
        self.mode = mode
        for chunk in self.trainer.model:
            chunk.eval()
        try:
            with torch.no_grad():
                self.trainer.run_microbatches(batches, forward_only=True)
        finally:
            for chunk in self.trainer.model:
                chunk.train()
            self.mode = "train"

    def _mismatch_metrics(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """Training-inference mismatch: trainer's recomputed old log-probs vs the engine's."""
        if not (self.last_stage and self.tp_rank0):
            return
        for batch in batches:
            mb = int(batch["mb_index"])
            mask = batch["loss_mask"].bool()
            if not mask.any():
                continue
            diff = (self.progress.store["old"][mb].cpu() - batch["rollout_logprobs"])[mask]
            self.metrics.add("mismatch/logprob_abs_mean", diff.abs().sum(), diff.numel())
            self.metrics.peak("mismatch/logprob_abs_max", diff.abs().max())
            self.metrics.add("mismatch/ratio_mean", diff.exp().sum(), diff.numel())

    def microbatches(self, split: str, start: int, num_microbatches: int) -> list[dict[str, torch.Tensor]]:
        del start
        if split != "train":
            raise ValueError("the rl stage evaluates with rl.eval_interval, not train.eval_interval")
        if len(self.step_batches) != num_microbatches:
            raise RuntimeError(
                f"rl: {len(self.step_batches)} micro-batches prepared, trainer expects {num_microbatches}"
            )
        return self.step_batches

    def forward_step(self, data_iterator: Iterator, model: torch.nn.Module):
        batch = next(data_iterator)
        mb, chunk = int(batch["mb_index"]), self.chunk_index[id(model)]
        if self.replay is not None:
            self._route(batch, mb, chunk, model)
        packed = pack_batch(batch["tokens"], batch["labels"], batch["loss_mask"], batch["position_ids"])
        packed = packed.to(current_device())
        logits = model(packed.tokens, packed.position_ids, None, packed_seq_params=packed.packed_seq_params)
        if self.replay is not None and self.mode == "old" and self.replay.mode == "r2":
            self.replay.collect(mb, chunk, model)
        elif self.replay is not None and self.mode == "train":
            RoutingReplay.after_forward(model)  # a recompute in backward replays the same routing
        return logits, partial(self._loss, batch, packed.labels)

    def _route(self, batch: dict[str, torch.Tensor], mb: int, chunk: int, model: torch.nn.Module) -> None:
        """Set this chunk's routers for the coming forward: R2 records in the old-log-prob pass and
        replays in the update; R3 replays the engine's routing in both; the reference routes freely."""
        if self.mode == "ref":
            RoutingReplay.release(model)
        elif self.replay.mode == "r2":
            if self.mode == "old":
                RoutingReplay.record(model)
            else:
                self.replay.replay(mb, chunk, model)
        else:
            if "routed_experts" not in batch:
                raise RuntimeError("rl.routing_replay=r3: the micro-batch carries no rollout routing")
            targets = rollout_targets(
                batch["routed_experts"].to(current_device()),
                self.moe_ordinals[chunk],
                self.arch.num_experts,
                self.sp_slice,
            )
            RoutingReplay.set_targets(model, targets)

    def _loss(self, batch: dict[str, torch.Tensor], labels: torch.Tensor, logits: torch.Tensor):
        rows, mb = batch["tokens"].shape, int(batch["mb_index"])
        device = logits.device
        logprobs = token_logprobs(logits, labels, self.rl.temperature).view(rows)
        if self.mode != "train":
            self.progress.store[self.mode][mb] = logprobs.detach()
            zero = torch.zeros((), device=device)
            return zero, torch.zeros((), dtype=torch.int, device=device), {}
        mask = batch["loss_mask"].to(device).bool()
        old = self.progress.store["old"][mb]
        adv = batch["advantages"].to(device)
        if self.rl.tis_clip is not None:
            behaviour = batch["rollout_logprobs"].to(device)
            weight = torch.where(
                mask, (old - behaviour).exp().clamp(max=self.rl.tis_clip), torch.zeros_like(old)
            )
            adv = (adv if adv.dim() == 2 else adv[:, None]) * weight
        loss, metrics = policy_loss(
            self.rl,
            LossInputs(
                logprobs,
                old,
                adv,
                mask,
                ref_logprobs=self.progress.store["ref"].get(mb),
                group_ids=batch["group_ids"].to(device),
                domain_ids=batch["domain_ids"].to(device),
            ),
        )
        n_seq = mask.any(-1).sum()
        if (
            n_seq == 0
            and (self.trainer.state.iteration % self.spr) in self.progress.empty_steps
            and mb % len(self.step_batches) == 0
        ):
            n_seq = torch.ones_like(n_seq)  # no data anywhere this step: avoid dividing gradients by 0
        entropy = token_entropy(logits, self.rl.temperature).view(mask.shape)  # collective over TP
        if self.tp_rank0:
            self._loss_metrics(metrics, entropy, logprobs, old, adv, mask, int(n_seq))
        return (
            loss,
            n_seq.to(torch.int),
            {"policy loss": torch.stack([loss.detach(), n_seq.detach().to(loss.dtype)])},
        )

    def _loss_metrics(self, metrics, entropy, logprobs, old, adv, mask, n_seq: int) -> None:
        tokens = float(mask.sum())
        if tokens == 0:
            return
        m = self.metrics
        for key, value in metrics.items():
            value = float(value)
            if key in PEAK_METRICS:
                m.peak(key, value)
            elif key in ("pg_loss", "kl"):
                m.add(key, value, n_seq)  # num_sequences=1: a sum over sequences
            elif key.startswith(TOKEN_METRICS):
                m.add(key, value * tokens, tokens)
            else:
                m.add(key, value * n_seq, n_seq)
        m.add("entropy", float(entropy[mask].sum()), tokens)
        for key, count in token_regimes(self.rl, logprobs.detach(), old, adv, mask).items():
            m.add(f"tokens_{key}_frac", float(count), tokens)

    # --- logging and state ------------------------------------------------------------------------
    def log_metrics(self) -> dict[str, float]:
        """Called once per step after the update: the step's metrics, and the routers set free."""
        if self.replay is not None:
            for chunk in self.trainer.model:
                RoutingReplay.release(chunk)
        out = self.metrics.reduce()
        it = self.trainer.state.iteration
        evals, self.pending_eval = self.pending_eval, {}
        due = self.rl.eval_interval and (it % self.rl.eval_interval == 0 or it == self.trainer.total_iters)
        if due and (not evals or it == self.trainer.total_iters):  # the pre-training eval shows first
            evals = self._evaluate()
        out.update(evals)
        if it == self.trainer.total_iters:
            self.manager.shutdown()
        return out

    def state_dict(self) -> dict[str, Any]:
        it = self.trainer.state.iteration
        state: dict[str, Any] = {"rollout_index": self.progress.rollout_index}
        if self.pass_rates is not None:
            state["pass_rates"] = [float(p) for p in self.pass_rates]
        if it % self.spr or self.manager.pending_index() is not None:
            state["side_file"] = str(
                save_side_state(self.progress, self.replay, self.manager, self.recipe.checkpoint, it)
            )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._saved = dict(state)
