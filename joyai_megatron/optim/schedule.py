"""Learning-rate schedules and the batch-size ramp, in tokens.

JoyAI's schedule is stated in tokens (warm-up over ~100B tokens while the batch ramps 13M -> 38M
tokens).  Megatron-Core's ``OptimizerParamScheduler`` counts *samples* when stepped by the global
batch size, so tokens are converted once here with the sequence length.
"""

from __future__ import annotations

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from joyai_megatron.config.schema import OptimCfg, SchedulerCfg


def tokens_to_samples(tokens: int, seq_length: int) -> int:
    return -(-int(tokens) // seq_length)


def build_scheduler(
    optimizer: object,
    optim: OptimCfg,
    sched: SchedulerCfg,
    *,
    seq_length: int,
    train_samples: int,
) -> OptimizerParamScheduler:
    """Warm-up then the decay style, from ``optim.lr`` to ``optim.min_lr``; stepped in samples."""
    warmup = tokens_to_samples(sched.warmup_tokens, seq_length)
    decay = tokens_to_samples(sched.decay_tokens, seq_length) if sched.decay_tokens else train_samples
    if sched.decay_style != "constant" and decay <= warmup:
        raise ValueError(
            f"scheduler: decay length ({decay} samples) must exceed warm-up ({warmup} samples); "
            "set scheduler.decay_tokens or train length"
        )
    wsd = tokens_to_samples(sched.wsd_decay_tokens, seq_length) if sched.wsd_decay_tokens else None
    return OptimizerParamScheduler(
        optimizer,
        init_lr=sched.warmup_init_lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(decay, warmup + 1),
        lr_decay_style=sched.decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(decay, 1),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
        wsd_decay_steps=wsd,
        lr_wsd_decay_style=sched.wsd_decay_style if wsd else None,
    )
