"""Map an architecture plus the recipe's layout and precision to Megatron-Core's config."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.transformer_config import MLATransformerConfig

from joyai_megatron.compat.grad_accum import use_torch_wgrad_accumulation
from joyai_megatron.config.schema import ModelCfg, ParallelCfg, PrecisionCfg
from joyai_megatron.model.presets import ModelArch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_transformer_config(
    arch: ModelArch,
    model: ModelCfg,
    parallel: ParallelCfg,
    precision: PrecisionCfg,
    *,
    use_cpu_initialization: bool | None = None,
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
    on_gpu = torch.cuda.is_available()
    te = model.backend == "te"
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
        # (config/layout.py checks); the local backend all-gathers K/V whatever this says.
        cp_comm_type=parallel.cp_comm_type if parallel.cp > 1 else None,
        sequence_parallel=parallel.sequence_parallel,
        # CP pads every document to a multiple of 2*CP, so a micro-batch's token count varies:
        # pipeline stages exchange shapes before each activation (p2p_communication.py l.322).
        variable_seq_lengths=parallel.cp > 1 and parallel.pp > 1,
        # Shapes.
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        kv_channels=arch.v_head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=True,  # MLA's q_a_layernorm / kv_a_layernorm on the latent vectors
        init_method_std=arch.init_method_std,
        attention_dropout=model.attention_dropout,
        hidden_dropout=model.hidden_dropout,
        # MLA.
        multi_latent_attention=True,
        q_lora_rank=arch.q_lora_rank,
        kv_lora_rank=arch.kv_lora_rank,
        qk_head_dim=arch.qk_head_dim,
        qk_pos_emb_head_dim=arch.qk_pos_emb_head_dim,
        v_head_dim=arch.v_head_dim,
        rope_type="rope",  # config.json has no rope_scaling block
        rotary_base=arch.rotary_base,
        rotary_scaling_factor=1.0,
        mscale=1.0,
        mscale_all_dim=0.0,
        apply_rope_fusion=te and on_gpu,
        qk_clip=model.qk_clip,
        qk_clip_threshold=model.qk_clip_threshold,
        qk_clip_alpha=model.qk_clip_alpha,
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
        moe_router_padding_for_fp8=model.moe_router_padding_for_fp8,
        moe_permute_fusion=te and on_gpu,
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
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        # Weight gradients accumulate straight into DDP's fp32 main_grad (Apex, or compat/grad_accum.py).
        gradient_accumulation_fusion=on_gpu and use_torch_wgrad_accumulation(),
        cross_entropy_loss_fusion=on_gpu,
        bias_dropout_fusion=False,
        # Recompute.
        recompute_granularity=recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=model.recompute_num_layers if recompute == "full" else None,
        recompute_modules=list(model.recompute_modules) if recompute == "selective" else None,
        use_cpu_initialization=(not on_gpu) if use_cpu_initialization is None else use_cpu_initialization,
        calculate_per_token_loss=True,
    )
