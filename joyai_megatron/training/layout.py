"""Parallel-layout validation that runs before any process group exists.

A layout error found after 256 ranks have initialised NCCL wastes minutes of a large allocation and
usually surfaces as an opaque assertion; here every rule names the values that break it.
"""

from __future__ import annotations

from dataclasses import dataclass

from joyai_megatron.config.schema import Recipe
from joyai_megatron.errors import UserError
from joyai_megatron.model.presets import ModelArch


class LayoutError(UserError, ValueError):
    """A parallel layout that cannot run; the message names the offending values."""


@dataclass(frozen=True)
class Layout:
    world_size: int
    tp: int
    pp: int
    cp: int
    ep: int
    etp: int
    dp: int
    expert_dp: int
    vpp: int | None


def _require(ok: bool, message: str, errors: list[str]) -> None:
    if not ok:
        errors.append(message)


def validate_layout(recipe: Recipe, arch: ModelArch, world_size: int) -> Layout:
    """Check every divisibility rule Megatron-Core relies on; raise one error listing all breaks."""
    p, t = recipe.parallel, recipe.train
    errors: list[str] = []
    for name in ("tp", "pp", "ep", "etp", "cp"):
        _require(getattr(p, name) >= 1, f"parallel.{name} must be >= 1, got {getattr(p, name)}", errors)
    if errors:
        raise LayoutError("invalid parallel layout:\n  " + "\n  ".join(errors))

    model_parallel = p.tp * p.pp * p.cp
    _require(
        world_size % model_parallel == 0,
        f"world size {world_size} is not divisible by tp*pp*cp = {p.tp}*{p.pp}*{p.cp} = {model_parallel}",
        errors,
    )
    expert_parallel = p.etp * p.ep * p.pp
    _require(
        world_size % expert_parallel == 0,
        f"world size {world_size} is not divisible by etp*ep*pp = {p.etp}*{p.ep}*{p.pp} = {expert_parallel}",
        errors,
    )
    dp = max(world_size // model_parallel, 1)
    expert_dp = max(world_size // expert_parallel, 1)

    # Tensor parallelism splits heads, FFN columns and the vocabulary; expert parallelism splits
    # experts; expert-TP splits each expert's FFN.
    splits = [
        ("num_attention_heads", arch.num_attention_heads, "tp", p.tp),
        ("ffn_hidden_size", arch.ffn_hidden_size, "tp", p.tp),
        ("vocab_size", arch.vocab_size, "tp", p.tp),
        ("num_experts", arch.num_experts, "ep", p.ep),
        ("moe_ffn_hidden_size", arch.moe_ffn_hidden_size, "etp", p.etp),
    ]
    if arch.num_shared_experts:
        splits.append(("shared expert width", arch.shared_expert_hidden_size, "tp", p.tp))
    for what, size, by_name, by in splits:
        _require(size % by == 0, f"{what} {size} is not divisible by {by_name} {by}", errors)
    _require(
        arch.moe_router_topk <= arch.num_experts,
        f"moe_router_topk {arch.moe_router_topk} exceeds num_experts {arch.num_experts}",
        errors,
    )
    # Pipeline parallelism: an explicit layout string, or layers split evenly.
    if p.pp_layout:
        errors.extend(_check_pp_layout(p.pp_layout, p.pp, p.vpp, arch, recipe.model.mtp_enabled))
    elif p.pp > 1 or p.vpp:
        chunks = p.pp * (p.vpp or 1)
        _require(
            arch.num_layers % chunks == 0,
            f"num_layers {arch.num_layers} is not divisible by pp*vpp = {p.pp}*{p.vpp or 1} = {chunks}; "
            "set parallel.pp_layout (e.g. 'Et|(tt|)*19mL') for an uneven split",
            errors,
        )
    _require(p.vpp is None or p.pp > 1, f"parallel.vpp={p.vpp} needs pp > 1 (pp={p.pp})", errors)
    # Sequence and context parallelism split the sequence.
    if p.cp > 1:
        errors.extend(_check_context_parallel(recipe, arch))
    if p.sequence_parallel:
        _require(p.tp > 1, "parallel.sequence_parallel needs tp > 1", errors)
        _require(
            (t.seq_length * t.micro_batch_size) % (p.tp * p.cp) == 0,
            f"tokens per micro-batch {t.seq_length}*{t.micro_batch_size} not divisible by tp*cp={p.tp * p.cp}",
            errors,
        )
    if p.ep > 1 or p.etp > 1:
        _require(
            not (p.sequence_parallel is False and p.tp > 1 and p.ep > 1),
            f"tp={p.tp} with ep={p.ep} needs parallel.sequence_parallel=true (Megatron-Core MoE rule)",
            errors,
        )
    # Batch arithmetic.
    _require(
        t.micro_batch_size >= 1, f"train.micro_batch_size must be >= 1, got {t.micro_batch_size}", errors
    )
    per_step = t.micro_batch_size * dp
    _require(
        t.global_batch_size % per_step == 0,
        f"global_batch_size {t.global_batch_size} is not divisible by micro_batch_size*dp = "
        f"{t.micro_batch_size}*{dp} = {per_step}",
        errors,
    )
    if t.rampup_batch_size:
        if len(t.rampup_batch_size) != 3:
            errors.append(
                f"train.rampup_batch_size must be [start, increment, samples], got {t.rampup_batch_size}"
            )
        else:
            start, incr, _ = t.rampup_batch_size
            _require(
                start % per_step == 0, f"ramp start batch {start} not divisible by mbs*dp={per_step}", errors
            )
            _require(
                incr % per_step == 0, f"ramp increment {incr} not divisible by mbs*dp={per_step}", errors
            )
            _require(
                (t.global_batch_size - start) % max(incr, 1) == 0,
                f"global_batch_size {t.global_batch_size} - ramp start {start} not divisible by increment {incr}",
                errors,
            )
    _require(
        t.seq_length <= arch.max_position_embeddings,
        f"seq_length {t.seq_length} exceeds max_position_embeddings {arch.max_position_embeddings}",
        errors,
    )
    if errors:
        raise LayoutError(f"invalid parallel layout for world size {world_size}:\n  " + "\n  ".join(errors))
    return Layout(world_size, p.tp, p.pp, p.cp, p.ep, p.etp, dp, expert_dp, p.vpp)


# TE 2.12's CP attention (attn_forward_func_with_cp): MLA (k and v head dims differ) only with p2p or
# a2a+p2p, and a2a+p2p (hierarchical) not with THD batches, which every stage passes.
CP_COMM_TYPES = ("p2p", "a2a", "all_gather", "a2a+p2p")


def _check_context_parallel(recipe: Recipe, arch: ModelArch) -> list[str]:
    """CP splits every document into 2*CP chunks (training/packing.py pads documents to that
    multiple), so a row of whole causal sequences must divide evenly; padding makes token counts
    vary between micro-batches, which two Megatron-Core paths cannot take."""
    p, t, m = recipe.parallel, recipe.train, recipe.model
    errors: list[str] = []
    _require(
        t.seq_length % (2 * p.cp) == 0,
        f"seq_length {t.seq_length} is not divisible by 2*cp = {2 * p.cp} (each rank holds 2 of 2*cp chunks)",
        errors,
    )
    _require(
        p.cp_comm_type in CP_COMM_TYPES,
        f"parallel.cp_comm_type must be one of {CP_COMM_TYPES}, got {p.cp_comm_type!r}",
        errors,
    )
    if m.backend == "te":
        _require(
            p.cp_comm_type == "p2p",
            f"parallel.cp_comm_type={p.cp_comm_type!r} with model.backend=te: Transformer Engine's CP "
            "attention takes MLA's unequal q/k (192) and v (128) head dims only with p2p for packed (THD) "
            "batches",
            errors,
        )
    if m.moe_token_dispatcher == "allgather" and (p.pp > 1 or p.ep > 1):
        errors.append(
            f"cp={p.cp} with {'pp' if p.pp > 1 else 'ep'}>1 needs model.moe_token_dispatcher=alltoall (or "
            "flex): documents padded to multiples of 2*cp make token counts differ between micro-batches, "
            "which the allgather dispatcher (an equal-size all-gather over EP, no variable_seq_lengths) refuses"
        )
    mtp = arch.mtp_num_layers if m.mtp_enabled else 0
    _require(
        mtp <= 1,
        f"cp={p.cp} with {mtp} MTP layers: the MTP loss is normalised exactly under CP for one layer only",
        errors,
    )
    return errors


def _check_pp_layout(layout: str, pp: int, vpp: int | None, arch: ModelArch, mtp: bool) -> list[str]:
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    try:
        parsed = PipelineParallelLayerLayout(layout, pp)
        parsed.validate_layer_layout(
            num_layers=arch.num_layers, mtp_num_layers=arch.mtp_num_layers if mtp else None
        )
    except (AssertionError, ValueError) as err:
        return [f"parallel.pp_layout {layout!r} does not fit pp={pp}, num_layers={arch.num_layers}: {err}"]
    return []
