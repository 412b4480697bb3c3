"""Map an architecture plus the recipe's layout and precision to Megatron-Core's config."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.transformer_config import MLATransformerConfig

from joyai_megatron.compat.grad_accum import wgrad_accumulation_available
from joyai_megatron.compat.target import assume_transformer_engine
from joyai_megatron.config.schema import ModelCfg, ParallelCfg, PrecisionCfg
from joyai_megatron.errors import UserError
from joyai_megatron.model.presets import ModelArch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# FP8 GEMMs in cuBLAS (through Transformer Engine) need every matrix dimension divisible by 16
# ("(ret.lda % 16) == 0 ... Caller must pad"); the router stays in fp32 and routed-expert token
# counts are padded by ``moe_router_padding_for_fp8``.
FP8_GEMM_MULTIPLE = 16


def fp8_gemm_shapes(arch: ModelArch) -> dict[str, tuple[int, int]]:
    """(in, out) features of every linear layer that runs in FP8 under Transformer Engine."""
    heads = arch.num_attention_heads
    shapes = {
        "linear_kv_down_proj": (arch.hidden_size, arch.kv_lora_rank + arch.qk_pos_emb_head_dim),
        "linear_kv_up_proj": (arch.kv_lora_rank, heads * (arch.qk_head_dim + arch.v_head_dim)),
        "linear_proj": (heads * arch.v_head_dim, arch.hidden_size),
        "dense linear_fc1": (arch.hidden_size, 2 * arch.ffn_hidden_size),
        "dense linear_fc2": (arch.ffn_hidden_size, arch.hidden_size),
        "expert linear_fc1": (arch.hidden_size, 2 * arch.moe_ffn_hidden_size),
        "expert linear_fc2": (arch.moe_ffn_hidden_size, arch.hidden_size),
    }
    q_out = heads * (arch.qk_head_dim + arch.qk_pos_emb_head_dim)
    if arch.q_lora_rank:
        shapes["linear_q_down_proj"] = (arch.hidden_size, arch.q_lora_rank)
        shapes["linear_q_up_proj"] = (arch.q_lora_rank, q_out)
    else:
        shapes["linear_q_proj"] = (arch.hidden_size, q_out)
    if arch.shared_expert_hidden_size:
        shapes["shared_experts linear_fc1"] = (arch.hidden_size, 2 * arch.shared_expert_hidden_size)
        shapes["shared_experts linear_fc2"] = (arch.shared_expert_hidden_size, arch.hidden_size)
    if arch.mtp_num_layers:
        shapes["mtp eh_proj"] = (2 * arch.hidden_size, arch.hidden_size)
    return shapes


def check_fp8_shapes(arch: ModelArch, precision: PrecisionCfg, preset: str) -> None:
    """Refuse FP8 for an architecture whose GEMM dims cuBLAS cannot run in FP8, naming them."""
    if not precision.fp8:
        return
    bad = [
        f"{name} {fan_in}x{fan_out}"
        for name, (fan_in, fan_out) in fp8_gemm_shapes(arch).items()
        if fan_in % FP8_GEMM_MULTIPLE or fan_out % FP8_GEMM_MULTIPLE
    ]
    if bad:
        raise ValueError(
            f"precision.fp8={precision.fp8}: model preset {preset!r} has linear layers whose dims are not "
            f"multiples of {FP8_GEMM_MULTIPLE}, which FP8 GEMMs need: {', '.join(bad)}; "
            "set precision.fp8=null or change model.arch"
        )


# Megatron-Core config fields -> the recipe key that sets them, to name the key to change when
# Megatron-Core rejects a config (its messages name its own fields).
RECIPE_KEYS = {
    "fp8": "precision.fp8",
    "fp8_recipe": "precision.fp8_recipe",
    "fp8_param": "precision.fp8_param_gather",
    "fp8_param_gather": "precision.fp8_param_gather",
    "bf16": "precision.dtype",
    "fp16": "precision.dtype",
    "params_dtype": "precision.dtype",
    "moe_router_padding_for_fp8": "model.moe_router_padding_for_fp8",
    "moe_router_padding_for_quantization": "model.moe_router_padding_for_fp8",
    "moe_token_dispatcher_type": "model.moe_token_dispatcher",
    "moe_grouped_gemm": "model.moe_grouped_gemm",
    "moe_router_load_balancing_type": "model.moe_load_balancing",
    "moe_aux_loss_coeff": "model.moe_aux_loss_coeff",
    "recompute_granularity": "model.recompute",
    "recompute_modules": "model.recompute_modules",
    "recompute_num_layers": "model.recompute_num_layers",
    "mtp_num_layers": "model.mtp_enabled",
    "qk_clip": "model.qk_clip",
    "bias_activation_fusion": "model.bias_activation_fusion",
    "moe_router_fusion": "model.moe_router_fusion",
    "moe_shared_expert_overlap": "model.moe_shared_expert_overlap",
    "cross_entropy_fusion_impl": "model.cross_entropy_fusion_impl",
    "tensor_model_parallel_size": "parallel.tp",
    "pipeline_model_parallel_size": "parallel.pp",
    "virtual_pipeline_model_parallel_size": "parallel.vpp",
    "pipeline_model_parallel_layout": "parallel.pp_layout",
    "expert_model_parallel_size": "parallel.ep",
    "expert_tensor_parallel_size": "parallel.etp",
    "context_parallel_size": "parallel.cp",
    "sequence_parallel": "parallel.sequence_parallel",
    "num_layers": "model.arch.num_layers",
    "num_moe_experts": "model.arch.num_experts",
}


class ConfigRejected(UserError, ValueError):
    """Megatron-Core refuses the config a recipe builds; ``keys`` are the recipe keys involved."""

    def __init__(self, reason: str, keys: list[str]) -> None:
        self.reason, self.keys = reason, keys
        where = f" (recipe keys: {', '.join(keys)})" if keys else ""
        super().__init__(f"Megatron-Core rejects this recipe: {reason}{where}")


def recipe_keys_in(message: str) -> list[str]:
    """The recipe keys behind the Megatron-Core fields a message names."""
    words = set(re.findall(r"[A-Za-z0-9_]+", message))
    return sorted({key for field_name, key in RECIPE_KEYS.items() if field_name in words})


def check_gpu_config(arch: ModelArch, model: ModelCfg, parallel: ParallelCfg, precision: PrecisionCfg) -> None:
    """Build, here, the exact ``MLATransformerConfig`` the GPU job will build with Transformer Engine,
    so Megatron-Core's own checks run before any GPU is allocated; raise :class:`ConfigRejected`."""
    check_fusions(model)  # ours, not Megatron-Core's: raised as it is
    try:
        with assume_transformer_engine():
            build_transformer_config(arch, model, parallel, precision, use_cpu_initialization=True, on_gpu=True)
    except (ValueError, AssertionError, NotImplementedError) as err:
        reason = str(err).strip() or type(err).__name__
        raise ConfigRejected(reason, recipe_keys_in(reason)) from err


CROSS_ENTROPY_IMPLS = ("native", "te")
GROUPED_GEMM_IMPLS = ("auto", "torch")


def check_fusions(model: ModelCfg) -> None:
    """Refuse kernel-fusion keys the recipe's backend has no kernel for, naming the key."""
    if model.moe_grouped_gemm_impl not in GROUPED_GEMM_IMPLS:
        raise ValueError(
            f"model.moe_grouped_gemm_impl must be one of {GROUPED_GEMM_IMPLS}, "
            f"got {model.moe_grouped_gemm_impl!r}"
        )
    if model.moe_grouped_gemm_impl == "torch" and not model.moe_grouped_gemm:
        raise ValueError("model.moe_grouped_gemm_impl=torch needs model.moe_grouped_gemm=true")
    if model.cross_entropy_fusion_impl not in CROSS_ENTROPY_IMPLS:
        raise ValueError(
            f"model.cross_entropy_fusion_impl must be one of {CROSS_ENTROPY_IMPLS}, "
            f"got {model.cross_entropy_fusion_impl!r}"
        )
    if model.backend != "te":
        for key, on in (
            ("moe_router_fusion", model.moe_router_fusion),
            ("cross_entropy_fusion_impl", model.cross_entropy_fusion_impl == "te"),
        ):
            if on:
                raise ValueError(
                    f"model.{key} is a Transformer Engine kernel: it needs model.backend=te "
                    f"(this recipe has {model.backend!r})"
                )


# Recipe keys that are Megatron-Core TransformerConfig fields of the same name.
_ARCH_SAME_NAME = (
    *("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "init_method_std"),
    *("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"),
)
_MODEL_SAME_NAME = ("attention_dropout", "hidden_dropout", "qk_clip", "qk_clip_threshold", "qk_clip_alpha")


def build_transformer_config(
    arch: ModelArch,
    model: ModelCfg,
    parallel: ParallelCfg,
    precision: PrecisionCfg,
    *,
    use_cpu_initialization: bool | None = None,
    on_gpu: bool | None = None,
) -> MLATransformerConfig:
    """The one place where JoyAI's architecture becomes Megatron-Core settings.

    Routing follows DeepSeek-V3's ``noaux_tc``: sigmoid scores, a per-expert bias that only steers
    top-k selection and is updated from load counts (aux-loss-free balancing), normalised top-k
    weights scaled by ``routed_scaling_factor``, all in fp32.
    """
    if model.backend not in ("te", "local"):
        raise ValueError(f"model.backend must be 'te' or 'local', got {model.backend!r}")
    if precision.dtype not in _DTYPES:
        raise ValueError(f"precision.dtype must be one of {sorted(_DTYPES)}, got {precision.dtype!r}")
    check_fp8_shapes(arch, precision, model.preset)
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    te = model.backend == "te"
    check_fusions(model)
    dtype = _DTYPES[precision.dtype]
    recompute = None if model.recompute == "none" else model.recompute
    return MLATransformerConfig(
        # Layout.
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        pipeline_model_parallel_layout=parallel.pp_layout,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp,
        context_parallel_size=parallel.cp,
        # MLA's q/k (192) and v (128) head dims: TE's CP attention takes them with p2p only
        # (training/layout.py checks); the local backend all-gathers K/V whatever this says.
        cp_comm_type=parallel.cp_comm_type if parallel.cp > 1 else None,
        sequence_parallel=parallel.sequence_parallel,
        # CP pads every document to a multiple of 2*CP, so a micro-batch's token count varies:
        # pipeline stages exchange shapes before each activation (p2p_communication.py l.322).
        variable_seq_lengths=parallel.cp > 1 and parallel.pp > 1,
        # Shapes.
        **{key: getattr(arch, key) for key in _ARCH_SAME_NAME},
        kv_channels=arch.v_head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=True,  # MLA's q_a_layernorm / kv_a_layernorm on the latent vectors
        **{key: getattr(model, key) for key in _MODEL_SAME_NAME},
        # MLA.
        multi_latent_attention=True,
        rope_type="rope",  # config.json has no rope_scaling block
        rotary_base=arch.rotary_base,
        rotary_scaling_factor=1.0,
        mscale=1.0,
        mscale_all_dim=0.0,
        # Megatron-Core fuses MLA's RoPE only for YARN (multi_latent_attention.py rejects it for
        # plain "rope"); JoyAI has no rope_scaling block, so RoPE stays unfused on every backend.
        apply_rope_fusion=False,
        # MoE.
        moe_layer_freq=list(arch.moe_layer_freq),
        num_moe_experts=arch.num_experts,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=arch.shared_expert_hidden_size or None,
        moe_router_topk=arch.moe_router_topk,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=model.moe_bias_update_rate,
        moe_router_topk_scaling_factor=arch.routed_scaling_factor,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type=model.moe_load_balancing,
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_token_dispatcher_type=model.moe_token_dispatcher,
        moe_grouped_gemm=model.moe_grouped_gemm,
        moe_router_padding_for_quantization=model.moe_router_padding_for_fp8,
        # TE's fused permutation; off for PyTorch's grouped experts, whose sync-free dispatch
        # (compat/dispatch.py) permutes with known sizes.
        moe_permute_fusion=te and on_gpu and model.moe_grouped_gemm_impl != "torch",
        moe_router_fusion=model.moe_router_fusion and on_gpu,
        moe_shared_expert_overlap=model.moe_shared_expert_overlap and on_gpu,
        # Dense MTP.
        mtp_num_layers=arch.mtp_num_layers if model.mtp_enabled and arch.mtp_num_layers else None,
        mtp_loss_scaling_factor=model.mtp_loss_weight,
        # Precision.
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        fp8=precision.fp8,
        fp8_recipe=precision.fp8_recipe if precision.fp8 else "delayed",
        fp8_param=precision.fp8_param_gather,
        # Kernels: fusions need CUDA (and TE for some); the local backend runs plain PyTorch.
        attention_backend=AttnBackend.auto if te else AttnBackend.local,
        # Fused SwiGLU (torch.compile'd; on CPU too, where it is tested against the unfused form).
        bias_activation_fusion=model.bias_activation_fusion,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        # Weight gradients accumulate straight into DDP's fp32 main_grad (Apex, or compat/grad_accum.py).
        gradient_accumulation_fusion=on_gpu and wgrad_accumulation_available(),
        cross_entropy_loss_fusion=on_gpu,
        cross_entropy_fusion_impl=model.cross_entropy_fusion_impl if on_gpu else "native",
        # Upstream's default "full" warns that it is deprecated; [] means the same (the whole layer).
        cuda_graph_modules=[],
        bias_dropout_fusion=False,
        # Recompute.
        recompute_granularity=recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=model.recompute_num_layers if recompute == "full" else None,
        recompute_modules=list(model.recompute_modules) if recompute == "selective" else None,
        use_cpu_initialization=(not on_gpu) if use_cpu_initialization is None else use_cpu_initialization,
        calculate_per_token_loss=True,
    )
