"""Build the JoyAI GPTModel (MLA + MoE + dense MTP) from a recipe."""

from __future__ import annotations

from collections.abc import Callable

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig

from joyai_megatron.compat.dispatch import use_sync_free_dispatch
from joyai_megatron.model.presets import ModelArch
from joyai_megatron.model.spec import decoder_block_spec, mtp_block_spec


def build_joyai_model(
    config: TransformerConfig,
    arch: ModelArch,
    backend: str,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
    max_sequence_length: int | None = None,
    grouped_gemm_impl: str = "auto",
) -> GPTModel:
    """One pipeline chunk of the model: Megatron-Core's GPTModel on our layer and MTP specs.

    Embeddings stay untied (JoyAI has a separate LM head); MLA applies its own rotary embedding,
    so the GPTModel-level one is unused.  MoE layers whose experts are all local dispatch without
    host syncs (:mod:`joyai_megatron.compat.dispatch`); the process-wide patches the model relies on
    (:func:`joyai_megatron.compat.install`) are in place once process groups exist.
    """
    model = GPTModel(
        config=config,
        transformer_layer_spec=decoder_block_spec(
            config, backend, vp_stage=vp_stage, pp_rank=pp_rank, grouped_gemm_impl=grouped_gemm_impl
        ),
        vocab_size=arch.vocab_size,
        max_sequence_length=max_sequence_length or arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=int(arch.rotary_base),
        mtp_block_spec=mtp_block_spec(config, backend, vp_stage=vp_stage, pp_rank=pp_rank),
        vp_stage=vp_stage,
        pg_collection=None,
    )
    use_sync_free_dispatch(model)
    return model


def build_model_chunks(
    config: TransformerConfig,
    arch: ModelArch,
    backend: str,
    *,
    vpp: int | None,
    seq_length: int,
    prepare: Callable[[GPTModel], None] | None = None,
    grouped_gemm_impl: str = "auto",
) -> list[torch.nn.Module]:
    """This pipeline rank's chunks (one per virtual stage with ``vpp``), each on the GPU when one is
    visible and in a ``Float16Module`` for BF16/FP16; no DDP.  ``prepare(model)`` runs on each bare
    GPTModel before it is moved or wrapped (the trainer freezes parameters there)."""
    chunks: list[torch.nn.Module] = []
    for i in range(vpp or 1):
        vp_stage = i if vpp else None
        model = build_joyai_model(
            config,
            arch,
            backend,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage,
            max_sequence_length=seq_length,
            grouped_gemm_impl=grouped_gemm_impl,
        )
        if prepare is not None:
            prepare(model)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())  # gpu-only
        chunks.append(Float16Module(config, model) if config.bf16 or config.fp16 else model)
    return chunks
