"""The one trainer core every stage runs on.

Order of work: validate the layout (no process group yet) -> distributed init -> model chunks
(PP/VPP) wrapped in Megatron-Core DDP -> Muon/AdamW -> schedule -> resume or initial load ->
stage data -> loop (forward/backward through Megatron-Core's pipeline schedules, optimizer step,
logging, evaluation, checkpoints, signals).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.distributed import finalize_model_grads
from megatron.core.num_microbatches_calculator import (
    destroy_num_microbatches_calculator,
    get_current_global_batch_size,
    get_num_microbatches,
    init_num_microbatches_calculator,
    update_num_microbatches,
)
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

from joyai_megatron.config.recipe import save_resolved_recipe
from joyai_megatron.config.schema import Recipe
from joyai_megatron.model.build import build_model_chunks
from joyai_megatron.model.config import build_transformer_config
from joyai_megatron.model.count import flops_per_token
from joyai_megatron.model.experts import frozen_expert_weights
from joyai_megatron.model.presets import recipe_arch
from joyai_megatron.model.spec import require_transformer_engine
from joyai_megatron.optim.batch_ramp import batch_size_at, batch_sizes, ramp_thresholds, schedule_string
from joyai_megatron.optim.builder import build_optimizer
from joyai_megatron.optim.schedule import build_scheduler, tokens_to_samples
from joyai_megatron.training import checkpoint as ckpt
from joyai_megatron.training.checkpoint_scan import start_point
from joyai_megatron.training.ddp import forward_pre_hooks_off, wrap_in_ddp
from joyai_megatron.training.distributed import init_distributed, init_model_parallel, read_dist_env, set_seed
from joyai_megatron.training.layout import LayoutError, validate_layout
from joyai_megatron.training.metrics import MetricsLogger, interval_means
from joyai_megatron.training.signals import ExitSignalHandler
from joyai_megatron.training.stage import Stage


def _output_requires_grad(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return output.requires_grad_(torch.is_grad_enabled())


class Trainer:
    def __init__(self, recipe: Recipe, stage: type[Stage]) -> None:
        self.recipe = recipe
        self.arch = recipe_arch(recipe)
        env = read_dist_env()
        self.layout = validate_layout(recipe, self.arch, env.world_size)  # before any process group
        if self.layout.cp > 1 and not stage.supports_context_parallel:
            raise LayoutError(
                f"parallel.cp={self.layout.cp}: the {stage.name} stage does not split its batches over "
                "context-parallel ranks (pretrain, sft and dpo do); use parallel.cp=1"
            )
        stage.check_recipe(recipe)  # the stage's keys and files, also before any process group
        self.stage = stage(recipe)
        if recipe.model.backend == "te":
            require_transformer_engine()
        self.env = init_distributed()
        init_model_parallel(self.layout)
        set_seed(recipe.train.seed)
        t = recipe.train
        self.batch_thresholds = ramp_thresholds(t.rampup_batch_size, t.global_batch_size)
        destroy_num_microbatches_calculator()
        init_num_microbatches_calculator(
            self.env.rank,
            global_batch_size=t.global_batch_size,
            micro_batch_size=t.micro_batch_size,
            data_parallel_size=self.layout.dp,
            step_batch_size_schedule=schedule_string(self.batch_thresholds),
            seq_length=t.seq_length,
        )
        self.total_iters, self.train_samples = self._train_length()
        self.config = build_transformer_config(self.arch, recipe.model, recipe.parallel, recipe.precision)
        self.stage.configure_model(self.config)
        self.model = self._build_model()
        c = recipe.checkpoint
        self.start = start_point(c.dir, c.load, c.allow_fresh_start)  # what _load will load
        self.stage.on_model_built(self)
        self.optimizer = build_optimizer(recipe.optim, recipe.parallel, recipe.precision, self.model)
        self.scheduler = build_scheduler(
            self.optimizer,
            recipe.optim,
            recipe.scheduler,
            seq_length=t.seq_length,
            train_samples=self.train_samples,
        )
        self._wire_config_hooks()
        self.state = ckpt.TrainState()
        self.resumed_from = self._load()
        update_num_microbatches(self.state.consumed_samples, consistency_check=False)
        valid = (
            t.eval_iters * t.global_batch_size * (self.total_iters // t.eval_interval + 2)
            if t.eval_interval
            else 0
        )
        self.stage.build_datasets(self.train_samples, valid)
        self.stage.load_state_dict(self.state.stage)
        self.logger = MetricsLogger(recipe, self.is_log_rank(), self._flops_per_token(), self.env.world_size)
        self.signals = ExitSignalHandler(recipe.checkpoint.exit_signals)
        self.async_saves = AsyncCallsQueue() if recipe.checkpoint.async_save else None
        self.history: list[dict[str, float]] = []
        self._expert_counts: list[torch.Tensor] = []
        self.stage.setup(self)

    # --- construction -----------------------------------------------------------------------------
    def _train_length(self) -> tuple[int, int]:
        t = self.recipe.train
        if (t.train_iters is None) == (t.train_tokens is None):
            raise ValueError("set exactly one of train.train_iters and train.train_tokens")
        if t.train_iters is not None:
            return t.train_iters, sum(batch_sizes(t.train_iters, self.batch_thresholds, t.seq_length))
        samples = tokens_to_samples(t.train_tokens, t.seq_length)
        iters, total = 0, 0
        while total < samples:
            total += batch_size_at(total, self.batch_thresholds, t.seq_length)
            iters += 1
        return iters, samples

    def _build_model(self) -> list[torch.nn.Module]:
        def freeze(model: torch.nn.Module) -> None:
            for name, param in model.named_parameters():
                if any(part in name for part in self.stage.frozen_parameters):
                    param.requires_grad_(False)  # before DDP: no grad buffer, no optimizer state
            embedding = getattr(model, "embedding", None)
            if embedding is not None and not any(q.requires_grad for q in embedding.parameters()):
                # Full recompute checkpoints layer blocks reentrantly: a block whose input needs no
                # gradient (the output of a frozen embedding) is never recomputed in backward and
                # its parameters silently get no gradient at all.  The MTP block embeds through the
                # same module.
                embedding.register_forward_hook(_output_requires_grad)

        chunks = build_model_chunks(
            self.config,
            self.arch,
            self.recipe.model.backend,
            vpp=self.layout.vpp,
            seq_length=self.recipe.train.seq_length,
            prepare=freeze,
            grouped_gemm_impl=self.recipe.model.moe_grouped_gemm_impl,
        )
        chunks = wrap_in_ddp(
            chunks,
            self.config,
            self.recipe.parallel,
            optimizer=self.recipe.optim.optimizer,
            world_size=self.env.world_size,
        )
        for chunk in chunks:
            chunk.broadcast_params()
        return chunks

    def _wire_config_hooks(self) -> None:
        """What Megatron-Core's schedules call back into: loss scaling, grad finalisation, no-sync."""
        self.config.grad_scale_func = self.optimizer.scale_loss
        self.config.finalize_model_grads_func = self._finalize_grads
        if self.recipe.parallel.overlap_grad_reduce:
            no_sync = [m.no_sync for m in self.model]
            self.config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        if self.recipe.parallel.overlap_param_gather:
            sync = [m.start_param_sync for m in self.model]
            self.config.param_sync_func = sync[0] if len(sync) == 1 else sync

    def _finalize_grads(self, model: list, num_tokens: torch.Tensor | None = None, **kwargs: Any) -> None:
        # Snapshot expert loads before finalize_model_grads all-reduces and resets them while
        # updating the aux-loss-free expert bias.
        self._expert_counts = [
            r.local_tokens_per_expert.detach().clone()
            for chunk in model
            for r in chunk.modules()
            if isinstance(r, TopKRouter) and getattr(r, "local_tokens_per_expert", None) is not None
        ]
        finalize_model_grads(model, num_tokens, **kwargs)

    def _routers(self) -> list[TopKRouter]:
        return [m for chunk in self.model for m in chunk.modules() if isinstance(m, TopKRouter)]

    def _flops_per_token(self) -> float:
        return flops_per_token(self.arch, self.recipe.train.seq_length, mtp=self.recipe.model.mtp_enabled)

    def is_log_rank(self) -> bool:
        return self.env.rank == 0

    # --- checkpoints ------------------------------------------------------------------------------
    def _load(self) -> str | None:
        """Resume from ``checkpoint.dir`` if it holds a checkpoint, else start from ``checkpoint.load``."""
        c, start = self.recipe.checkpoint, self.start
        if start.note and self.is_log_rank():
            print(f"note: {start.note}", flush=True)
        if start.path is None:
            return None
        path, resuming = start.path, start.resuming
        optimizer = c.resume_optimizer if resuming and c.resume_optimizer is not None else c.load_optimizer
        state = ckpt.load_checkpoint(
            path,
            self.model,
            self.optimizer,
            self.scheduler,
            load_optimizer=optimizer,
            load_counters=resuming or not c.reset_counters,
            allow_missing=[] if resuming else list(c.allow_missing),
        )
        if state is not None:
            self.state = state
        elif resuming:
            raise RuntimeError(f"{path}: resume checkpoint has no trainer state (train_state.json)")
        else:
            # Loaded optimizer param groups carry the previous stage's last LR; re-apply this
            # stage's fresh schedule so its first step does not run at that LR.
            self.scheduler.step(0)
        return str(path)

    def save(self) -> Path:
        """Save with every parameter current on every rank: with ZeRO-1's overlapped param
        all-gather the shards other ranks updated arrive only in the next forward's pre-hooks, and
        the checkpoint (written by DP rank 0) would hold the previous step's values for them, as
        Megatron-LM's ``save_checkpoint_and_time`` avoids by the same hook toggle."""
        self.state.stage = self.stage.state_dict()
        with forward_pre_hooks_off(self.model, param_sync=True):
            return self._write_checkpoint()

    def _write_checkpoint(self) -> Path:
        return ckpt.save_checkpoint(
            self.recipe.checkpoint.dir,
            self.recipe,
            self.model,
            self.optimizer,
            self.scheduler,
            self.state,
            self.recipe.checkpoint.keep_last,
            write_extras=self.stage.write_checkpoint_extras,
            async_queue=self.async_saves,
        )

    # --- steps ------------------------------------------------------------------------------------
    def run_microbatches(self, batches: list, forward_only: bool) -> list[dict[str, torch.Tensor]]:
        t = self.recipe.train
        iterators = [iter(batches) for _ in self.model] if len(self.model) > 1 else iter(batches)
        with frozen_expert_weights():  # the optimizer steps only after the pass
            return get_forward_backward_func()(
                forward_step_func=self.stage.forward_step,
                data_iterator=iterators,
                model=self.model,
                num_microbatches=len(batches),
                seq_length=t.seq_length * t.micro_batch_size,
                micro_batch_size=1,
                decoder_seq_length=t.seq_length * t.micro_batch_size,
                forward_only=forward_only,
            )

    def _reduce_losses(self, losses: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Token-weighted means over micro-batches and data-parallel ranks, on every rank."""
        keys = sorted({k for d in losses for k in d})
        keys_t = [keys]
        dist.broadcast_object_list(keys_t, src=dist.get_world_size() - 1)
        keys = keys_t[0]
        contributes = (
            parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        )
        totals = torch.zeros(len(keys), 2, dtype=torch.float64)
        if contributes:
            for d in losses:
                for i, k in enumerate(keys):
                    if k in d:
                        totals[i] += d[k].detach().double().cpu()
        if torch.cuda.is_available():
            totals = totals.cuda()  # gpu-only
        dist.all_reduce(totals)
        return {
            k.replace(" ", "_"): float(totals[i, 0] / totals[i, 1].clamp(min=1)) for i, k in enumerate(keys)
        }

    def _all_reduce(self, values: list[float], op: dist.ReduceOp.RedOpType) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64)
        if torch.cuda.is_available():
            tensor = tensor.cuda()  # gpu-only
        dist.all_reduce(tensor, op=op)
        return tensor.tolist()

    def _mtp_loss(self, num_microbatches: int) -> float:
        """MTP loss averaged over micro-batches and DP ranks; only the stage holding the MTP block
        has it, so every rank joins one all-reduce with that stage's value."""
        tracker = MTPLossLoggingHelper.tracker
        value = 0.0
        if "loss_values" in tracker:
            MTPLossLoggingHelper.reduce_metrics_in_tracker()
            owner = (
                parallel_state.get_tensor_model_parallel_rank() == 0
                and parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
                and parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            )
            if owner:
                value = float(tracker["loss_values"].sum()) / num_microbatches
            MTPLossLoggingHelper.clean_metrics_in_tracker()
        return self._all_reduce([value], dist.ReduceOp.SUM)[0]

    def _moe_stats(self) -> dict[str, float]:
        """Worst expert-load spread (max/min tokens per expert, over this step's global batch) and
        the expert-bias range, over all MoE layers on all pipeline stages."""
        spread, bias_lo, bias_hi = 0.0, float("-inf"), float("-inf")
        if self._expert_counts:
            counts = torch.stack([c.double() for c in self._expert_counts])
            if torch.cuda.is_available():
                counts = counts.cuda()  # gpu-only
            dist.all_reduce(
                counts, group=parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
            )
            spread = float((counts.max(dim=1).values / counts.min(dim=1).values.clamp(min=1)).max())
        routers = [r for r in self._routers() if r.expert_bias is not None]
        if routers:
            biases = torch.stack([r.expert_bias.detach().float().cpu() for r in routers])
            bias_lo, bias_hi = -float(biases.min()), float(biases.max())
        spread, bias_lo, bias_hi = self._all_reduce([spread, bias_lo, bias_hi], dist.ReduceOp.MAX)
        if bias_hi == float("-inf"):
            return {}
        return {"moe/load_max_over_min": spread, "moe/bias_min": -bias_lo, "moe/bias_max": bias_hi}

    def train_step(self) -> dict[str, float]:
        self.stage.before_step(self)
        num_mb = get_num_microbatches()
        batch_size = get_current_global_batch_size()
        batches = self.stage.microbatches("train", self.state.consumed_samples, num_mb)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self.run_microbatches(batches, forward_only=False)
        if self.state.iteration + 1 in self.recipe.logging.param_grad_norms_at:
            self._write_param_grad_norms(self.state.iteration + 1)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=batch_size)
        max_logit = self.clip_qk() if self.config.qk_clip else None
        self.state.iteration += 1
        self.state.consumed_samples += batch_size
        tokens = batch_size * self.recipe.train.seq_length
        self.state.consumed_tokens += tokens
        self.logger.count_tokens(tokens)
        update_num_microbatches(self.state.consumed_samples, consistency_check=True)
        values = self._reduce_losses(losses)
        mtp = self._mtp_loss(num_mb) if self.config.mtp_num_layers and self.stage.uses_mtp_loss else None
        if "lm_loss" in values:
            values["loss"] = values["lm_loss"] + (
                self.config.mtp_loss_scaling_factor * mtp if mtp is not None else 0.0
            )
        if mtp is not None:
            values["mtp_loss"] = mtp
        values["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        if max_logit is not None:
            values["max_attention_logit"] = max_logit
        values["lr"] = max(g["lr"] for g in self.optimizer.param_groups)
        values["global_batch_size"] = float(batch_size)
        values["consumed_tokens"] = float(self.state.consumed_tokens)
        values.update(self._moe_stats())
        values.update({f"stage/{k}": v for k, v in self.stage.log_metrics().items()})
        return values

    def _write_param_grad_norms(self, step: int) -> None:
        """This rank's reduced gradient norm per parameter (its ``main_grad``), before clipping.

        Exact per tensor at DP=1; under the distributed optimizer at DP>1 each rank's buffer holds
        only its reduced shard, so compare such runs at DP=1."""
        norms: dict[str, float] = {}
        for i, chunk in enumerate(self.model):
            prefix = f"chunk{i}." if len(self.model) > 1 else ""
            for name, param in chunk.named_parameters():
                grad = getattr(param, "main_grad", None)
                grad = param.grad if grad is None else grad
                if grad is not None:
                    norms[prefix + name] = float(grad.detach().float().norm())
        out = Path(self.recipe.logging.dir) / "param_grad_norms"
        out.mkdir(parents=True, exist_ok=True)
        rank = dist.get_rank() if dist.is_initialized() else 0
        path = out / f"step_{step}.rank{rank}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(norms, indent=0, sort_keys=True))
        tmp.replace(path)

    def clip_qk(self) -> float:
        """MuonClip after the optimizer step: Megatron-Core's ``clip_qk`` rescales the query and key
        up-projections of every decoder attention layer whose largest logit of the step exceeded
        ``model.qk_clip_threshold``; returns that largest logit (over DP ranks, this PP stage).

        ``clip_qk`` reaches the layers as ``chunk.module.module`` (DDP, then Float16Module); an
        FP32 model has no Float16Module, so it gets a stand-in for that level."""
        from megatron.core.optimizer.qk_clip import clip_qk

        chunks = [c if isinstance(c.module, Float16Module) else SimpleNamespace(module=c) for c in self.model]
        return clip_qk(chunks)

    def evaluate(self) -> dict[str, float]:
        t = self.recipe.train
        for chunk in self.model:
            chunk.eval()
        results: list[dict[str, torch.Tensor]] = []
        with torch.no_grad():
            for i in range(t.eval_iters):
                start = i * t.global_batch_size
                batches = self.stage.microbatches("valid", start, get_num_microbatches())
                results.extend(self.run_microbatches(batches, forward_only=True))
        for chunk in self.model:
            chunk.train()
        MTPLossLoggingHelper.clean_metrics_in_tracker()
        return {f"valid/{k}": v for k, v in self._reduce_losses(results).items()}

    # --- loop -------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        r = self.recipe
        if self.is_log_rank():
            save_resolved_recipe(r, r.logging.dir)
            where = f"resumed from {self.resumed_from}" if self.resumed_from else "from scratch"
            print(
                f"[{r.stage}] {r.name}: {self.total_iters} steps, layout tp={self.layout.tp} pp={self.layout.pp} "
                f"cp={self.layout.cp} ep={self.layout.ep} dp={self.layout.dp}, {where} at step {self.state.iteration}",
                flush=True,
            )
        start_time = time.time()
        saved_at = None
        exit_reason = "finished"
        window: list[dict[str, float]] = []  # steps since the last log line
        while self.state.iteration < self.total_iters:
            values = self.train_step()
            step = self.state.iteration
            self.history.append({"step": step, **values})
            window.append(values)
            if step == 1 or step % max(r.logging.interval, 1) == 0 or step == self.total_iters:
                self.logger.log(step, self.total_iters, interval_means(window))
                window = []
            if r.train.eval_interval and step % r.train.eval_interval == 0:
                evals = self.evaluate()
                self.history[-1].update(evals)
                self.logger.scalars(step, evals)
                if self.is_log_rank():
                    print(" | ".join(f"{k} {v:.4f}" for k, v in evals.items()), flush=True)
            if r.checkpoint.save_interval and step % r.checkpoint.save_interval == 0:
                self.save()
                saved_at = step
            if self.async_saves is not None:
                self.async_saves.maybe_finalize_async_calls(blocking=False)
            if self.signals.should_exit():
                exit_reason = "signal"
                break
            if r.train.exit_duration_mins and (time.time() - start_time) / 60 > r.train.exit_duration_mins:
                exit_reason = "duration"
                break
        path: Path | str
        if saved_at == self.state.iteration:
            path = ckpt.iter_dir(r.checkpoint.dir, self.state.iteration)
        elif r.checkpoint.save_at_end:
            path = self.save()
        else:
            path = "none (checkpoint.save_at_end=false)"
        if self.async_saves is not None:
            self.async_saves.maybe_finalize_async_calls(blocking=True)
            self.async_saves.close()
        if self.is_log_rank():
            print(f"[{r.stage}] {exit_reason} at step {self.state.iteration}; checkpoint {path}", flush=True)
        self.logger.close()
        self.signals.restore()
        result = {"exit_reason": exit_reason, "checkpoint": str(path), "history": self.history}
        self.stage.on_train_end(self, result)
        return result

    @property
    def train_state(self) -> dict[str, Any]:
        return dataclasses.asdict(self.state)
