"""``python -m joyai_megatron plan``: does a recipe's layout fit N x G GPUs, and how long is a step?

Runs on a login node in a second, before any GPU is allocated (the Slurm preflight): it validates
the parallel layout for N*G ranks, then estimates the memory of the most loaded rank from the
architecture alone (no model is built) and a step time from the analytic FLOP count.  Every term
and constant is explained in ``docs/plan.md``; sizes are decimal GB (1e9 bytes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from joyai_megatron.config.recipe import RecipeError, load_recipe
from joyai_megatron.config.schema import Recipe
from joyai_megatron.model.config import check_gpu_config
from joyai_megatron.model.count import flops_per_token
from joyai_megatron.model.presets import ModelArch, recipe_arch
from joyai_megatron.training.layout import Layout, LayoutError, validate_layout

GB = 1e9
# Memory no tensor of ours may use: CUDA context, NCCL and cuBLAS/TE workspaces (fixed part) and
# caching-allocator fragmentation (fraction of the card).
RESERVE_FIXED_GB = 3.0
RESERVE_FRACTION = 0.10
# Dropless routing sends a rank more than its average share of tokens while the expert bias is
# still balancing; routed-expert activations are sized for this much above average.
MOE_ROUTING_SLACK = 1.2
DEFAULT_MFU = 0.35
DEFAULT_PEAK_TFLOPS = 989.0  # H100/H200 dense BF16
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


# --- parameters ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Params:
    """Parameters of a block on one rank, split the way the optimizer sees them: ``matrix`` are
    the 2-D weights Muon orthogonalises, ``other`` the embeddings, head and norms (AdamW)."""

    matrix: float = 0.0
    other: float = 0.0
    largest: float = 0.0  # largest single tensor: whole-tensor optimizer sharding is uneven by it

    def __add__(self, o: Params) -> Params:
        return Params(self.matrix + o.matrix, self.other + o.other, max(self.largest, o.largest))

    def __mul__(self, k: float) -> Params:
        return Params(self.matrix * k, self.other * k, self.largest if k else 0.0)

    @property
    def total(self) -> float:
        return self.matrix + self.other


def _matrices(*sizes: float) -> Params:
    return Params(matrix=sum(sizes), largest=max(sizes))


def _vectors(*sizes: float) -> Params:
    return Params(other=sum(sizes), largest=max(sizes))


def attention_params(arch: ModelArch, tp: int = 1) -> Params:
    """MLA: latent down-projections (replicated across TP under TE), up-projections and output
    projection (split by TP), the latent norms and the layer's input norm."""
    h, heads = arch.hidden_size, arch.num_attention_heads
    qk = arch.qk_head_dim + arch.qk_pos_emb_head_dim
    if arch.q_lora_rank:
        q = [h * arch.q_lora_rank, arch.q_lora_rank * heads * qk / tp]
        norms = [h, arch.q_lora_rank, arch.kv_lora_rank]
    else:
        q = [h * heads * qk / tp]
        norms = [h, arch.kv_lora_rank]
    kv = [
        h * (arch.kv_lora_rank + arch.qk_pos_emb_head_dim),
        arch.kv_lora_rank * heads * (arch.qk_head_dim + arch.v_head_dim) / tp,
    ]
    return _matrices(*q, *kv, heads * arch.v_head_dim * h / tp) + _vectors(*norms)


def dense_mlp_params(arch: ModelArch, tp: int = 1) -> Params:
    """SwiGLU: fused gate+up (2*ffn x h) and down (h x ffn), plus the pre-MLP norm."""
    h, f = arch.hidden_size, arch.ffn_hidden_size
    return _matrices(2 * f * h / tp, f * h / tp) + _vectors(h)


def moe_shared_params(arch: ModelArch, tp: int = 1) -> Params:
    """The non-expert part of an MoE layer: router (replicated), shared expert (split by TP), norm."""
    h, s = arch.hidden_size, arch.shared_expert_hidden_size
    shared = [2 * s * h / tp, s * h / tp] if s else []
    return _matrices(arch.num_experts * h, *shared) + _vectors(h)


def routed_expert_params(arch: ModelArch, ep: int = 1, etp: int = 1) -> Params:
    """This rank's routed experts of one MoE layer: num_experts/ep experts, each split by etp."""
    h, f = arch.hidden_size, arch.moe_ffn_hidden_size
    local = arch.num_experts // ep
    return Params(matrix=local * 3 * f * h / etp, largest=2 * f * h / etp)


def mtp_params(arch: ModelArch, tp: int = 1) -> Params:
    """One dense MTP block: enorm, hnorm, eh_proj [h, 2h], attention, dense MLP, its final norm."""
    h = arch.hidden_size
    return _matrices(2 * h * h) + _vectors(h, h, h) + attention_params(arch, tp) + dense_mlp_params(arch, tp)


def vocab_params(arch: ModelArch, tp: int = 1) -> Params:
    """The embedding table or the output head (vocab-parallel over TP)."""
    return _vectors(arch.vocab_size * arch.hidden_size / tp)


def decoder_layer_params(arch: ModelArch, index: int, tp: int = 1) -> Params:
    """Non-expert parameters of decoder layer ``index`` (dense FFN or router + shared expert)."""
    ffn = moe_shared_params(arch, tp) if arch.moe_layer_freq[index] else dense_mlp_params(arch, tp)
    return attention_params(arch, tp) + ffn


def model_param_counts(arch: ModelArch) -> dict[str, int]:
    """Whole-model counts (what ``count_model`` measures on the built model)."""
    layers = Params()
    for i in range(arch.num_layers):
        layers = layers + decoder_layer_params(arch, i)
        if arch.moe_layer_freq[i]:
            layers = layers + routed_expert_params(arch)
    vocab = vocab_params(arch).total
    total = layers.total + 2 * vocab + arch.hidden_size  # + final norm
    return {
        "total_params": round(total),
        "mtp_params": round(mtp_params(arch).total * arch.mtp_num_layers),
        "embedding_params": round(vocab),
        "output_params": round(vocab),
    }


# --- pipeline stages ----------------------------------------------------------------------------
@dataclass
class Chunk:
    """What one (pipeline rank, virtual stage) chunk builds."""

    layers: list[int] = field(default_factory=list)  # global decoder layer indices
    embedding: bool = False
    loss: bool = False
    mtp: int = 0


def pipeline_chunks(recipe: Recipe, arch: ModelArch) -> list[list[Chunk]]:
    """``[pp_rank][vpp_chunk]``: from ``parallel.pp_layout`` when set, else an even split with the
    embedding on the first chunk and the head and MTP on the last (Megatron-Core's default)."""
    p = recipe.parallel
    mtp = arch.mtp_num_layers if recipe.model.mtp_enabled else 0
    if p.pp_layout:
        from megatron.core.transformer.enums import LayerType
        from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

        parsed = PipelineParallelLayerLayout(p.pp_layout, p.pp)
        vpp = parsed.virtual_pipeline_model_parallel_size
        grid = [[Chunk() for _ in range(vpp)] for _ in range(p.pp)]
        next_layer = 0
        for v in range(vpp):
            for r in range(p.pp):
                chunk = grid[r][v]
                for kind in parsed.layout[r][v]:
                    if kind == LayerType.decoder:
                        chunk.layers.append(next_layer)
                        next_layer += 1
                    chunk.embedding |= kind == LayerType.embedding
                    chunk.loss |= kind == LayerType.loss
                    chunk.mtp += kind == LayerType.mtp
        return grid
    vpp = p.vpp or 1
    per_chunk = arch.num_layers // (p.pp * vpp)
    grid = [[Chunk() for _ in range(vpp)] for _ in range(p.pp)]
    for v in range(vpp):
        for r in range(p.pp):
            start = (v * p.pp + r) * per_chunk
            grid[r][v].layers = list(range(start, start + per_chunk))
    grid[0][0].embedding = True
    grid[-1][-1].loss = True
    grid[-1][-1].mtp = mtp
    return grid


def chunk_params(arch: ModelArch, chunk: Chunk, layout: Layout) -> tuple[Params, Params]:
    """(non-expert, expert) parameters one rank holds for a chunk."""
    dense, expert = Params(), Params()
    for i in chunk.layers:
        dense = dense + decoder_layer_params(arch, i, layout.tp)
        if arch.moe_layer_freq[i]:
            expert = expert + routed_expert_params(arch, layout.ep, layout.etp)
    if chunk.embedding:
        dense = dense + vocab_params(arch, layout.tp)
    if chunk.loss:
        dense = dense + vocab_params(arch, layout.tp) + _vectors(arch.hidden_size)
    if chunk.mtp:
        dense = dense + mtp_params(arch, layout.tp) * chunk.mtp
        if not chunk.embedding:  # MTP embeds token t+1: a synchronised copy of the embedding
            dense = dense + vocab_params(arch, layout.tp)
    return dense, expert


# --- activations --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ActivationSetting:
    """What one micro-batch's saved tensors depend on besides the architecture."""

    tokens: int  # tokens per micro-batch on this rank (mbs * seq / cp)
    act_bytes: int
    tp: int
    etp: int
    sequence_parallel: bool
    recompute: str  # none | selective | full
    modules: frozenset[str]  # selective recompute modules
    local_attention: bool  # local backend: SDPA with a [T, T] mask instead of flash attention
    cp: int = 1  # context-parallel size: attention reads the K/V of all cp ranks

    def drops(self, module: str) -> bool:
        return self.recompute == "selective" and module in self.modules


def attention_activation(arch: ModelArch, s: ActivationSetting) -> float:
    """Bytes saved by one MLA block for one micro-batch."""
    b, heads = s.act_bytes, arch.num_attention_heads
    hid = s.tp if s.sequence_parallel else 1  # hidden-sized tensors split only under SP
    per_token = arch.hidden_size * b / hid  # input norm's input
    if not s.drops("layernorm"):
        per_token += arch.hidden_size * b / hid
    if arch.q_lora_rank:
        per_token += 2 * arch.q_lora_rank * b  # q latent before and after its norm
    per_token += (2 * arch.kv_lora_rank + arch.qk_pos_emb_head_dim) * b
    qk = arch.qk_head_dim + arch.qk_pos_emb_head_dim
    if not s.drops("mla_up_proj"):
        per_token += heads * (2 * qk + arch.v_head_dim) * b / s.tp  # q, k, v into core attention
    per_token += heads * arch.v_head_dim * b / s.tp  # attention output (input of linear_proj)
    total = per_token * s.tokens
    if s.local_attention and not s.drops("core_attn"):
        total += s.tokens * s.tokens * s.cp  # the boolean block-causal mask SDPA keeps for backward
    if s.cp > 1 and not s.drops("core_attn"):
        if s.local_attention:  # K/V all-gathered over the CP group, kept by SDPA for backward
            total += s.cp * local_kv_bytes(arch, s)
        else:  # TE's p2p ring keeps the last K/V step it received and fp32 softmax statistics
            total += local_kv_bytes(arch, s) + s.tokens * heads / s.tp * 4
    return total


def local_kv_bytes(arch: ModelArch, s: ActivationSetting) -> float:
    """One CP rank's keys and values (``T`` tokens, this TP rank's heads) entering core attention."""
    qk = arch.qk_head_dim + arch.qk_pos_emb_head_dim
    return s.tokens * arch.num_attention_heads * (qk + arch.v_head_dim) * s.act_bytes / s.tp


def cp_attention_transient(arch: ModelArch, s: ActivationSetting) -> float:
    """Context-parallel attention buffers alive while one layer runs (the working set): TE's p2p
    ring holds every K/V step it received until the layer's forward ends (cp copies of the rank's
    K/V) and two K/V + dK/V double buffers in backward (4 copies); the local backend's backward
    holds dK/dV of the gathered keys (cp copies) before reduce-scattering them."""
    if s.cp == 1:
        return 0.0
    copies = s.cp if s.local_attention else max(s.cp, 4)
    return copies * local_kv_bytes(arch, s)


def dense_mlp_activation(arch: ModelArch, s: ActivationSetting) -> float:
    hid = s.tp if s.sequence_parallel else 1
    if s.drops("mlp"):
        return arch.hidden_size * s.act_bytes / hid * s.tokens
    per_token = 2 * arch.hidden_size / hid + 3 * arch.ffn_hidden_size / s.tp
    return per_token * s.act_bytes * s.tokens


def moe_activation(arch: ModelArch, s: ActivationSetting) -> float:
    """Router scores (fp32), the top-k dispatched tokens and their expert FFN, the combine."""
    b, h, k = s.act_bytes, arch.hidden_size, arch.moe_router_topk
    hid = s.tp if s.sequence_parallel else 1
    if s.drops("moe"):
        return h * b / hid * s.tokens
    per_token = h * b / hid * (1 if s.drops("layernorm") else 2)
    per_token += 2 * arch.num_experts * 4 / hid  # router logits and sigmoid scores, fp32
    f = arch.moe_ffn_hidden_size / s.etp
    routed = 2 * h + (2 if s.drops("moe_act") else 3) * f  # dispatched input, fc1 out, act out, combine
    per_token += k * routed * b / hid * MOE_ROUTING_SLACK
    if arch.num_shared_experts and not s.drops("shared_experts"):
        per_token += 3 * arch.shared_expert_hidden_size * b / s.tp
    return per_token * s.tokens


def layer_activation(arch: ModelArch, index: int, s: ActivationSetting) -> float:
    ffn = moe_activation if arch.moe_layer_freq[index] else dense_mlp_activation
    return attention_activation(arch, s) + ffn(arch, s)


def mtp_activation(arch: ModelArch, s: ActivationSetting) -> float:
    """enorm/hnorm inputs and outputs, the concatenation into eh_proj, then a dense layer."""
    hid = s.tp if s.sequence_parallel else 1
    eh = 6 * arch.hidden_size * s.act_bytes / hid * s.tokens
    return eh + attention_activation(arch, s) + dense_mlp_activation(arch, s)


def logits_activation(arch: ModelArch, s: ActivationSetting, heads: int) -> float:
    """The fp32 softmax the vocab-parallel cross entropy keeps for backward, per output head (main
    and MTP); the activation-dtype logits are freed once upcast (counted in the working set)."""
    return s.tokens * arch.vocab_size / s.tp * 4 * heads


def chunk_activation(arch: ModelArch, chunk: Chunk, s: ActivationSetting, group: int) -> tuple[float, float]:
    """(saved bytes for one micro-batch, transient working set while it runs backward).

    The working set is the un-recomputed activation of the largest layer (``group`` layers under
    full recompute), which also covers the all-to-all send/receive buffers of one MoE layer, plus
    the activation-dtype logits while they are upcast."""
    full = dataclasses.replace(s, recompute="none")
    hid = s.tp if s.sequence_parallel else 1
    layer_input = arch.hidden_size * s.act_bytes / hid * s.tokens
    working = max((layer_activation(arch, i, full) for i in chunk.layers), default=0.0)
    if s.recompute == "full":
        saved = -(-len(chunk.layers) // group) * layer_input
        working *= min(group, len(chunk.layers))
        saved += chunk.mtp * 2 * layer_input  # MTP recompute keeps its hidden and embedding inputs
    else:
        saved = sum(layer_activation(arch, i, s) for i in chunk.layers)
        saved += chunk.mtp * mtp_activation(arch, s)
    if chunk.mtp:
        working = max(working, mtp_activation(arch, full))
    if chunk.layers or chunk.mtp:
        working += cp_attention_transient(arch, s)
    if chunk.loss:
        saved += logits_activation(arch, s, 1 + chunk.mtp)
        working += s.tokens * arch.vocab_size / s.tp * s.act_bytes
    return saved, working


def in_flight(pp: int, vpp: int, rank: int, microbatches: int) -> float:
    """Micro-batches whose activations a pipeline rank holds at its peak, in units of the rank's
    whole stage: 1F1B keeps pp - rank; the interleaved schedule keeps (warm-up + 1) chunks."""
    if pp == 1:
        return 1.0
    if vpp == 1:
        return float(min(pp - rank, microbatches))
    warmup = (pp - rank - 1) * 2 + (vpp - 1) * pp
    return min(warmup + 1, microbatches * vpp) / vpp


# --- the estimate -------------------------------------------------------------------------------
@dataclass
class StageEstimate:
    pp_rank: int
    layers: str
    params: float
    weights: float
    grads: float
    optimizer: float
    activations: float  # saved for all in-flight micro-batches plus the working set
    in_flight: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


def _describe(chunks: list[Chunk]) -> str:
    parts = []
    for c in chunks:
        items = ["emb"] if c.embedding else []
        if c.layers:
            items.append(f"{c.layers[0]}-{c.layers[-1]}" if len(c.layers) > 1 else str(c.layers[0]))
        items += ["mtp"] * bool(c.mtp) + ["head"] * c.loss
        parts.append("+".join(items))
    return " | ".join(parts)


def optimizer_bytes(recipe: Recipe, dense: Params, expert: Params, layout: Layout) -> float:
    """fp32 master (unless the weights are fp32) + Muon momentum or Adam's two moments, sharded
    over data parallelism (dense) and expert data parallelism (experts) with the distributed
    optimizer; Muon's layer-wise variant keeps whole tensors, so a rank may hold one extra."""
    master = 0 if recipe.precision.dtype == "fp32" else 4
    muon = recipe.optim.optimizer == "muon"

    def state(p: Params) -> float:
        return (master + 4) * p.matrix + (master + 8) * p.other if muon else (master + 8) * p.total

    sharded = recipe.parallel.distributed_optimizer and layout.world_size > 1
    if not sharded:
        return state(dense) + state(expert)
    total = 0.0
    for p, ranks in ((dense, layout.dp * layout.cp), (expert, layout.expert_dp)):
        share = state(p) / ranks
        if muon and ranks > 1:
            share += (master + 8) * p.largest
        total += min(share, state(p))
    return total


def estimate(recipe: Recipe, arch: ModelArch, layout: Layout) -> list[StageEstimate]:
    t, p = recipe.train, recipe.parallel
    grid = pipeline_chunks(recipe, arch)
    act_bytes = _DTYPE_BYTES[recipe.precision.dtype]
    setting = ActivationSetting(
        # CP pads each document to a multiple of 2*cp (at most 2*cp-1 tokens per document): not counted.
        tokens=t.micro_batch_size * t.seq_length // p.cp,
        act_bytes=act_bytes,
        tp=p.tp,
        etp=p.etp,
        sequence_parallel=p.sequence_parallel,
        recompute=recipe.model.recompute,
        modules=frozenset(recipe.model.recompute_modules),
        local_attention=recipe.model.backend == "local",
        cp=p.cp,
    )
    microbatches = max(t.global_batch_size // (t.micro_batch_size * layout.dp), 1)
    stages = []
    for rank, chunks in enumerate(grid):
        dense, expert = Params(), Params()
        saved = working = 0.0
        for chunk in chunks:
            d, e = chunk_params(arch, chunk, layout)
            dense, expert = dense + d, expert + e
            s, w = chunk_activation(arch, chunk, setting, max(recipe.model.recompute_num_layers, 1))
            saved, working = saved + s, max(working, w)
        flight = in_flight(p.pp, len(chunks), rank, microbatches)
        params = dense.total + expert.total
        stages.append(
            StageEstimate(
                pp_rank=rank,
                layers=_describe(chunks),
                params=params,
                weights=params * act_bytes,
                grads=params * 4,  # DDP main grads in fp32 (grad_reduce_in_fp32)
                optimizer=optimizer_bytes(recipe, dense, expert, layout),
                activations=saved * flight + working,
                in_flight=flight,
            )
        )
    return stages


@dataclass(frozen=True)
class StepTime:
    flops_per_token: float
    tokens_per_step: int
    seconds: float
    tokens_per_second_per_gpu: float
    train_days: float | None


def step_time(recipe: Recipe, arch: ModelArch, world: int, mfu: float, peak_tflops: float) -> StepTime:
    """FLOPs per token x tokens per step / (GPUs x MFU x peak), at the final global batch."""
    t = recipe.train
    fpt = flops_per_token(arch, t.seq_length, mtp=recipe.model.mtp_enabled)
    tokens = t.global_batch_size * t.seq_length
    rate = world * mfu * peak_tflops * 1e12
    seconds = fpt * tokens / rate
    total_tokens = t.train_tokens if t.train_tokens is not None else (t.train_iters or 0) * tokens
    days = fpt * total_tokens / rate / 86400 if total_tokens else None
    return StepTime(fpt, tokens, seconds, tokens / seconds / world, days)


def reserve_gb(gpu_memory_gb: float, override: float | None = None) -> float:
    return override if override is not None else RESERVE_FIXED_GB + RESERVE_FRACTION * gpu_memory_gb


# --- command ------------------------------------------------------------------------------------
def _report(recipe_path: str, recipe: Recipe, arch: ModelArch, layout: Layout, args: Any) -> dict:
    stages = estimate(recipe, arch, layout)
    worst = max(stages, key=lambda s: s.total)
    reserve = reserve_gb(args.gpu_memory_gb, getattr(args, "reserve_gb", None))
    usable = args.gpu_memory_gb - reserve
    step = step_time(
        recipe,
        arch,
        layout.world_size,
        getattr(args, "mfu", None) or DEFAULT_MFU,
        getattr(args, "peak_tflops", None) or DEFAULT_PEAK_TFLOPS,
    )
    t = recipe.train
    return {
        "recipe": recipe_path,
        "nodes": args.nodes,
        "gpus_per_node": args.gpus_per_node,
        "layout": dataclasses.asdict(layout),
        "microbatches_per_step": t.global_batch_size // (t.micro_batch_size * layout.dp),
        "stages": [
            {**dataclasses.asdict(s), **{k: getattr(s, k) / GB for k in _COMPONENTS}, "total": s.total / GB}
            for s in stages
        ],
        "most_loaded_stage": worst.pp_rank,
        "per_gpu_gb": worst.total / GB,
        "gpu_memory_gb": args.gpu_memory_gb,
        "reserve_gb": reserve,
        "usable_gb": usable,
        "fits": worst.total / GB <= usable,
        "step": dataclasses.asdict(step),
    }


_COMPONENTS = ("weights", "grads", "optimizer", "activations")


def format_report(report: dict, recipe: Recipe) -> str:
    lay, m = report["layout"], recipe.model
    lines = [
        f"plan: {report['recipe']} on {report['nodes']} node(s) x {report['gpus_per_node']} GPU(s) "
        f"= {lay['world_size']} ranks",
        f"layout: tp={lay['tp']} pp={lay['pp']} cp={lay['cp']} ep={lay['ep']} etp={lay['etp']} | "
        f"dp={lay['dp']} expert-dp={lay['expert_dp']} | {report['microbatches_per_step']} micro-batches "
        f"of {recipe.train.micro_batch_size} x {recipe.train.seq_length} tokens per step",
        f"model: {m.preset} (MTP {'on' if m.mtp_enabled else 'off'}), {recipe.precision.dtype} weights, "
        f"fp32 grads, {recipe.optim.optimizer}"
        f"{' (distributed)' if recipe.parallel.distributed_optimizer else ''}, recompute {m.recompute}"
        + (f" {list(m.recompute_modules)}" if m.recompute == "selective" else ""),
        "",
        "per-GPU memory, GB (1e9 bytes), one row per pipeline stage:",
        f"{'stage':>5}  {'holds':<24} {'params':>8} {'weights':>8} {'grads':>7} {'optim':>7} "
        f"{'activ':>7} {'in-flight':>9} {'total':>7}",
    ]
    for s in report["stages"]:
        lines.append(
            f"{s['pp_rank']:>5}  {s['layers'][:24]:<24} {s['params'] / 1e9:>7.2f}B {s['weights']:>8.1f} "
            f"{s['grads']:>7.1f} {s['optimizer']:>7.1f} {s['activations']:>7.1f} "
            f"{s['in_flight']:>9.3g} {s['total']:>7.1f}"
        )
    verdict = "fits" if report["fits"] else "DOES NOT FIT"
    lines += [
        "",
        f"most loaded rank: stage {report['most_loaded_stage']}, {report['per_gpu_gb']:.1f} GB per GPU of "
        f"{report['usable_gb']:.1f} GB usable ({report['gpu_memory_gb']:g} GB - {report['reserve_gb']:.1f} "
        f"GB reserve): {verdict}",
    ]
    st = report["step"]
    days = f"; {st['train_days']:.1f} days for the recipe's length" if st["train_days"] else ""
    lines.append(
        f"step time: {st['flops_per_token'] / 1e9:.2f} GFLOP/token x {st['tokens_per_step'] / 1e6:.2f}M "
        f"tokens ~ {st['seconds']:.2f} s ({st['tokens_per_second_per_gpu']:,.0f} tokens/s/GPU){days}"
    )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Exit 0 when the layout is valid and fits, 1 when the estimate exceeds the usable memory,
    2 when the recipe or layout is invalid."""
    world = args.nodes * args.gpus_per_node
    try:
        if args.nodes < 1 or args.gpus_per_node < 1:
            raise LayoutError(
                f"--nodes ({args.nodes}) and --gpus-per-node ({args.gpus_per_node}) must be >= 1"
            )
        recipe = load_recipe(args.recipe, list(args.overrides))
        arch = recipe_arch(recipe)
        layout = validate_layout(recipe, arch, world)
        # The exact Megatron-Core config the GPU job builds, so its own checks refuse a recipe here
        # rather than at step 0 on the allocated GPUs.
        check_gpu_config(arch, recipe.model, recipe.parallel, recipe.precision)
    except (LayoutError, RecipeError, KeyError, ValueError) as err:
        print(f"plan: {args.recipe} on {args.nodes} x {args.gpus_per_node} GPUs: {err}", file=sys.stderr)
        return 2
    report = _report(args.recipe, recipe, arch, layout, args)
    print(json.dumps(report, indent=2) if args.json else format_report(report, recipe), flush=True)
    if not report["fits"]:
        print(
            f"plan: does not fit: pipeline stage {report['most_loaded_stage']} needs "
            f"{report['per_gpu_gb']:.1f} GB per GPU, more than the {report['usable_gb']:.1f} GB usable on a "
            f"{report['gpu_memory_gb']:g} GB GPU; use more GPUs (pipeline/expert parallelism), "
            "model.recompute=full or a smaller train.micro_batch_size",
            file=sys.stderr,
        )
        return 1
    return 0
