"""The recipe schema: every key a recipe may set, with its default.

Recipes are YAML merged onto these dataclasses with omegaconf, so a typo is an error rather than a
silently ignored setting.  Stage-specific sections (``sft``, ``dpo``, ``rl``, ``qat``) live here
too, so one resolved recipe describes any run and is saved beside every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelCfg:
    preset: str = "tiny"
    arch: dict[str, Any] = field(default_factory=dict)  # overrides of ModelArch fields
    backend: str = "local"  # te | local
    mtp_enabled: bool = True
    mtp_loss_weight: float = 0.1
    moe_token_dispatcher: str = "allgather"  # allgather | alltoall | flex
    moe_grouped_gemm: bool = False
    # Whose grouped GEMM runs the routed experts: "auto" (te: Transformer Engine's GroupedLinear,
    # which needs the per-expert token counts on the host; local: PyTorch's grouped_mm) or "torch"
    # (PyTorch's grouped_mm on either backend: device-side offsets, no host sync per MoE layer).
    moe_grouped_gemm_impl: str = "auto"
    moe_load_balancing: str = "none"  # none (aux-loss-free bias only) | seq_aux_loss | aux_loss
    moe_aux_loss_coeff: float = 0.0
    moe_bias_update_rate: float = 1e-3
    moe_router_padding_for_fp8: bool = False
    recompute: str = "none"  # none | selective | full
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"])
    recompute_num_layers: int = 1
    qk_clip: bool = False
    qk_clip_threshold: float = 100.0
    qk_clip_alpha: float = 0.5
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    # Kernel fusions (docs/benchmarks.md measures each): Megatron-Core's fused SwiGLU (for routed
    # experts with the routing weight folded in), Transformer Engine's fused sigmoid top-k router
    # (te backend), and the cross-entropy kernel behind the fused loss (native | te).
    bias_activation_fusion: bool = False
    moe_router_fusion: bool = False
    cross_entropy_fusion_impl: str = "native"
    # The shared expert on its own CUDA stream beside the token dispatch (alltoall dispatcher; the
    # same maths, so CPU runs, which have no streams, compute it in line).
    moe_shared_expert_overlap: bool = False


@dataclass
class ParallelCfg:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1  # expert tensor parallel
    cp: int = 1
    # How TE's CP attention exchanges K/V (te backend): MLA's unequal q/k and v head dims leave
    # "p2p" (ring) as the one TE 2.12 accepts for packed (THD) batches; the local backend all-gathers.
    cp_comm_type: str = "p2p"
    sequence_parallel: bool = False
    pp_layout: str | None = None  # e.g. "Et|(tt|)*19mL"
    vpp: int | None = None
    distributed_optimizer: bool = True  # ZeRO-1 (layer-wise for Muon)
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False


@dataclass
class PrecisionCfg:
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    fp8: str | None = None  # e4m3 | hybrid
    fp8_recipe: str = "blockwise"  # blockwise | tensorwise | delayed | mxfp8
    fp8_param_gather: bool = False


@dataclass
class TrainCfg:
    seq_length: int = 128
    micro_batch_size: int = 1
    global_batch_size: int = 8
    # [start_global_batch, increment, ramp_tokens]: a linear ramp to global_batch_size, run as
    # Megatron-Core's step batch-size schedule (see optim/batch_ramp.py)
    rampup_batch_size: list[int] | None = None
    train_iters: int | None = None
    train_tokens: int | None = None  # alternative to train_iters (counts consumed samples)
    seed: int = 1234
    eval_interval: int = 0  # 0 disables evaluation
    eval_iters: int = 2
    exit_duration_mins: float | None = None


@dataclass
class OptimCfg:
    optimizer: str = "muon"  # muon | adam
    lr: float = 4.2e-4
    min_lr: float = 0.0
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_num_ns_steps: int = 5
    muon_scale_mode: str = "spectral"
    muon_extra_scale_factor: float = 0.2
    muon_split_qkv: bool = True
    # Moonlight's Newton-Schulz: (3.4445, -4.7750, 2.0315) five times ("simple" in
    # emerging-optimizers); Megatron-Core's default "quintic" is a different, per-step sequence.
    muon_coefficient_type: str = "simple"
    # Orthogonalise a gated MLP's fused fc1 as its two matrices, gate and up, as Moonlight's Muon
    # does on the HF parameters (Megatron-Core orthogonalises the fused [gate; up] as one).
    muon_split_fc1: bool = True
    # "duplicated" (Megatron-Core's default): all-gather a TP-sharded matrix and orthogonalise it
    # whole, so the update equals the unsharded one; "blockwise" orthogonalises each shard alone
    # (no all-gather, but a different optimizer per TP size); "distributed": sharded Newton-Schulz.
    muon_tp_mode: str = "duplicated"


@dataclass
class SchedulerCfg:
    # Lengths in tokens, because a batch-size ramp makes iterations a poor unit.
    warmup_tokens: int = 0
    decay_tokens: int | None = None  # defaults to the run's train length
    decay_style: str = "cosine"  # constant | linear | cosine | inverse-square-root | WSD
    wsd_decay_tokens: int | None = None
    wsd_decay_style: str = "cosine"
    warmup_init_lr: float = 0.0


@dataclass
class DataCfg:
    tokenizer: str = ""  # directory with tokenizer.json (or an HF tokenizer directory)
    blend: str | None = None  # YAML of weighted datasets (data_prep blend format)
    paths: list[str] = field(default_factory=list)  # IndexedDataset prefixes, equal weights
    split: str = "98,2,0"
    mock: bool = False  # Megatron's MockGPTDataset: shapes only, for smoke and planning
    cache_dir: str | None = None
    reset_position_ids: bool = True
    reset_attention_mask: bool = True  # per-document attention inside a packed sequence
    eod_mask_loss: bool = False
    num_workers: int = 0
    sft_path: str | None = None  # packed SFT data (data_prep sft)
    dpo_path: str | None = None  # tokenized preference pairs (data_prep dpo)
    rl_path: str | None = None  # prompts with answers (data_prep rl)


@dataclass
class CheckpointCfg:
    dir: str = "runs/default/checkpoints"
    save_interval: int = 0  # 0: only at the end and on signals
    # false: no checkpoint when training ends (benchmarks: a 2B model's save is ~30 GB of disk)
    save_at_end: bool = True
    keep_last: int = 2
    load: str | None = None  # initial weights when dir has no checkpoint (previous stage / import)
    load_optimizer: bool = True  # with load: also take optimizer state and counters
    reset_counters: bool = False  # with load: start iteration, scheduler and data at zero
    # On resume from dir: restore the optimizer moments?  None follows load_optimizer.  A stage that
    # starts from another stage's weights with a fresh optimizer (load_optimizer: false) sets true,
    # so its own resumes are exact.
    resume_optimizer: bool | None = None
    allow_missing: list[str] = field(default_factory=list)  # key substrings absent in load
    # Train from step 0 although checkpoint.dir holds iter_* directories none of which is complete
    # (a dir with a complete checkpoint always resumes; see docs/failure_modes.md).
    allow_fresh_start: bool = False
    async_save: bool = False  # write in a background process while training continues
    exit_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])


@dataclass
class LoggingCfg:
    dir: str = "runs/default/logs"
    interval: int = 10
    tensorboard: bool = True
    wandb_project: str | None = None  # offline unless WANDB_API_KEY is set
    wandb_name: str | None = None
    # Steps whose per-parameter gradient norms (reduced, before clipping) are written to
    # <dir>/param_grad_norms/step_<N>.rank<R>.json: finds which tensors two backends or layouts
    # disagree on when the total norm does (Muon and Adam hide a per-tensor scale from the loss).
    param_grad_norms_at: list[int] = field(default_factory=list)


@dataclass
class SFTCfg:
    # Packed rows mix conversations, so the thinking share is set by blending two packed files:
    # a fraction ``thinking_ratio`` of rows from ``thinking_path``, the rest from ``data.sft_path``.
    thinking_ratio: float | None = None  # None: keep the data's mix (data.sft_path only)
    thinking_path: str | None = None  # packed SFT file of thinking conversations (data_prep sft)
    valid_path: str | None = None  # packed SFT file for evaluation (needed when eval_interval > 0)


@dataclass
class DPOCfg:
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | ipo
    sft_loss_weight: float = 0.0
    reference: str = "live"  # live | precomputed
    label_smoothing: float = 0.0
    reference_checkpoint: str | None = None  # frozen reference weights; defaults to checkpoint.load
    reference_logps: str | None = None  # precomputed file; defaults to <checkpoint.dir>/reference_logps.pt
    valid_path: str | None = None  # preference pairs for evaluation (needed when eval_interval > 0)


@dataclass
class AgenticCfg:
    """Multi-turn rollouts with tool calls (rl/agentic/, docs/rl.md section 11)."""

    enabled: bool = False
    tools: list[str] = field(default_factory=lambda: ["calculator"])  # registered tools the episodes may call
    max_turns: int = 4  # assistant turns per episode (a tool call at the last one truncates it)
    turn_timeout_s: float = 10.0  # tool execution per turn
    total_timeout_s: float = 300.0  # wall clock per episode
    truncated_reward: float = 0.0  # score of an episode that ended without an answer
    advantage_level: str = "trajectory"  # trajectory | turn
    tool_error_penalty: float = 0.0  # per failed tool call, charged to its turn (advantage_level: turn)


@dataclass
class RLCfg:
    loss: str = "fiberpo"  # fiberpo | fiberpo_domain | grpo | gspo
    # FiberPO budgets: the defaults of rl/fiberpo.py (reasoning in docs/fiberpo.md, section 3).
    delta: float = 7e-4
    c_minus: float = 3e-4
    eps: float = 1e-4
    # fiberpo_domain: budgets of the prompt-group and domain levels (rl/fiberpo_domain.py defaults).
    group_delta: float = 7e-4
    group_c_minus: float = 3e-4
    domain_delta: float = 7e-4
    domain_c_minus: float = 3e-4
    # grpo / gspo clip range; None takes the loss's own default (GRPO 0.2 / 0.2, GSPO 3e-4 / 4e-4).
    clip_eps_low: float | None = None
    clip_eps_high: float | None = None
    dual_clip: float | None = None  # grpo only
    kl_coef: float = 0.0  # > 0 keeps a frozen copy of the initial weights as the KL reference
    kl_type: str = "k3"  # k1 | k3
    group_size: int = 8  # samples per prompt
    prompts_per_step: int = 8  # prompts per rollout batch
    steps_per_rollout: int = 1  # optimizer steps (mini-batches) per rollout batch
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    normalize_std: bool = True
    filter_zero_variance: bool = True
    rollout_backend: str = "local"  # local | vllm | sglang
    rollout_args: dict[str, Any] = field(default_factory=dict)  # extra engine arguments (vllm/sglang)
    async_rollout: bool = False  # generate rollout k+1 while training on rollout k (one step stale)
    tis_clip: float | None = None  # truncated importance sampling of old-policy vs rollout log-probs
    routing_replay: str = "none"  # none | r2 (old-log-prob pass routing) | r3 (rollout engine routing)
    curriculum: bool = False
    pass_rates: str | None = None  # JSON {prompt id: pass rate}; None estimates them at start
    pass_rate_rollouts: int = 10
    reward: str = "math"  # a registered reward, or "prompt" (each prompt's own verifier field)
    # Code rewards refuse to run where bubblewrap is unusable; true runs model-written code with
    # this process's file-system and network access instead (loud warning; docs/rl.md section 10).
    unsafe_code_execution: bool = False
    eval_path: str | None = None  # held-out prompts (data_prep rl output) for greedy pass@1
    eval_interval: int = 0  # steps between evaluations (0: off); also before step 1 and at the end
    eval_prompts: int = 64
    agentic: AgenticCfg = field(default_factory=AgenticCfg)


@dataclass
class QATCfg:
    format: str = "int4_w4a16"  # int4_w4a16 | w4afp8 | fp8
    block_size: int = 128
    calib_batches: int = 4
    # dynamic: INT4 scales are the per-block absmax of the current weights at every forward
    # (fake quant = round-to-nearest of the master weights); static: ModelOpt's calibrated amax,
    # frozen after calibration and stored in the checkpoint.
    weight_amax: str = "dynamic"  # dynamic | static
    data: str = "pretrain"  # whose data and loss QAT trains on: pretrain | sft
    quantize_mtp: bool = False  # the MTP draft block stays high precision by default
    exclude: list[str] = field(default_factory=list)  # extra module-name wildcards left unquantized
    compare: bool = True  # evaluate unquantized / PTQ at the start and QAT at the end
    # Parameter-name substrings kept frozen during QAT, e.g. the unquantized embedding and LM head
    # ["embedding.", "output_layer."]: a fresh AdamW state would otherwise move them at full LR.
    freeze: list[str] = field(default_factory=list)


@dataclass
class Recipe:
    base: str | None = None  # path of the recipe this one extends (resolved at load time)
    name: str = "unnamed"
    stage: str = "pretrain"
    model: ModelCfg = field(default_factory=ModelCfg)
    parallel: ParallelCfg = field(default_factory=ParallelCfg)
    precision: PrecisionCfg = field(default_factory=PrecisionCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    scheduler: SchedulerCfg = field(default_factory=SchedulerCfg)
    data: DataCfg = field(default_factory=DataCfg)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)
    logging: LoggingCfg = field(default_factory=LoggingCfg)
    sft: SFTCfg = field(default_factory=SFTCfg)
    dpo: DPOCfg = field(default_factory=DPOCfg)
    rl: RLCfg = field(default_factory=RLCfg)
    qat: QATCfg = field(default_factory=QATCfg)
