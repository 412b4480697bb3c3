"""Core attention for the ``local`` backend (CPU and GPUs without Transformer Engine).

Megatron-Core's own ``DotProductAttention`` cannot serve MLA: it assumes one head dim for q, k and
v (MLA has 192 for q/k and 128 for v), rejects packed (THD) sequences and does not accept the
``k_channels``/``v_channels`` arguments MLA passes.  This module runs PyTorch's
``scaled_dot_product_attention`` instead, which handles unequal head dims, and turns packed
sequences or per-document masks into one boolean mask so documents never attend to each other.

Context parallelism (CP > 1): each rank holds two chunks of every document
(``model/context_parallel.py``).  Keys and values are all-gathered over the CP group (Megatron-Core's
``gather_from_sequence_parallel_region``, whose backward reduce-scatters their gradients back to the
ranks that own them), and the rank's queries attend to them under the block-causal mask of their
global positions: exact, with the memory of whole-sequence K/V on every rank (TE's ring attention
avoids that on GPUs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from joyai_megatron.model.context_parallel import all_partition_indices, partition_indices, segment_ids


def block_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total, total] bool mask, True where attention is allowed: causal within each segment."""
    seg = torch.zeros(total, dtype=torch.long, device=cu_seqlens.device)
    boundaries = cu_seqlens[1:-1].long()
    boundaries = boundaries[boundaries < total]
    seg.index_add_(0, boundaries, torch.ones_like(boundaries))
    seg = seg.cumsum(0)
    same = seg[:, None] == seg[None, :]
    causal = torch.ones(total, total, dtype=torch.bool, device=cu_seqlens.device).tril()
    return same & causal


class SDPACoreAttention(MegatronModule):
    """``softmax(q k^T * scale + mask) v`` with q/k and v head dims that may differ.

    Accepts Megatron's ``sbhd`` layout ([s, b, heads, dim]) with an optional boolean
    ``attention_mask`` where True means *masked out* (Megatron's convention), and the packed ``thd``
    layout ([tokens, heads, dim]) with ``PackedSeqParams.cu_seqlens_q``.
    """

    # Where unequal packed segments are attended one SDPA call each (reading their boundaries on
    # the host); elsewhere one call with a block-causal mask, which needs no device sync.
    segment_loop_devices: tuple[str, ...] = ("cpu",)

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        cp_comm_type: str | None = None,
        pg_collection: object | None = None,
    ) -> None:
        super().__init__(config=config)
        cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        if cp_group is None and config.context_parallel_size > 1:
            cp_group = parallel_state.get_context_parallel_group()
        self.cp_group = cp_group if config.context_parallel_size > 1 else None
        self.attn_mask_type = attn_mask_type
        k_channels = k_channels or config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else k_channels**-0.5
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        # Read by MLA's qk-clip (MuonClip) after each optimizer step.
        self.current_max_attn_logits: torch.Tensor | None = None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by the local core attention")
        if self.cp_group is not None and self.cp_group.size() > 1:
            return self._context_parallel(query, key, value, attention_mask, packed_seq_params)
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            rows = _equal_segments(packed_seq_params, query.shape[0])
            if rows:
                # Equal-length segments are a plain batch: causal attention per row, which the
                # fused SDPA kernels run without a dense mask (skipping the masked half).
                q, k, v = (x.reshape(rows, -1, *x.shape[1:]).transpose(1, 2) for x in (query, key, value))
                out = self._attend(q, k, v, None)  # [rows, h, s, dv]
                return out.transpose(1, 2).reshape(query.shape[0], out.shape[1], out.shape[-1])
            if query.device.type in self.segment_loop_devices:
                return self._attend_per_segment(query, key, value, packed_seq_params.cu_seqlens_q)
            allowed = block_causal_mask(packed_seq_params.cu_seqlens_q, query.shape[0])
            # [t, h, d] -> [1, h, t, d]
            q, k, v = (x.unsqueeze(0).transpose(1, 2) for x in (query, key, value))
            out = self._attend(q, k, v, allowed[None, None])
            return out.squeeze(0).transpose(0, 1).contiguous()  # [t, h, dv]

        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        if k.shape[1] != q.shape[1]:  # grouped-query attention
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        s_q, s_k = q.shape[2], k.shape[2]
        allowed = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril(s_k - s_q)
        allowed = allowed[None, None]
        if attention_mask is not None:
            allowed = allowed & ~attention_mask.bool()
        out = self._attend(q, k, v, allowed)
        b, h, s, dv = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, h * dv)

    def _context_parallel(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        packed_seq_params: PackedSeqParams | None,
    ) -> torch.Tensor:
        """This rank's queries against the K/V of the whole sequence, gathered over the CP group.

        THD ([t/cp, h, d]) with the batch's global ``cu_seqlens``; or ``sbhd`` ([s/cp, b, h, d]), one
        causal sequence per batch row split the same way (one segment of length ``s``).
        """
        group = self.cp_group
        cp_size, cp_rank = group.size(), group.rank()
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if thd:
            cu = packed_seq_params.cu_seqlens_q
        else:
            if attention_mask is not None:
                raise ValueError(
                    "the local CP attention takes no attention_mask; pack the batch (THD) instead"
                )
            cu = torch.tensor([0, query.shape[0] * cp_size], device=query.device)
        # Forward: all-gather along the token dim (rank order); backward: reduce-scatter of dK, dV.
        key = gather_from_sequence_parallel_region(key, tensor_parallel_output_grad=True, group=group)
        value = gather_from_sequence_parallel_region(value, tensor_parallel_output_grad=True, group=group)
        q_pos = partition_indices(cu, cp_size, cp_rank).to(query.device)
        k_pos = all_partition_indices(cu, cp_size).to(query.device)
        allowed = (segment_ids(q_pos, cu)[:, None] == segment_ids(k_pos, cu)[None, :]) & (
            k_pos[None, :] <= q_pos[:, None]
        )
        if thd:  # [t, h, d] -> [1, h, t, d]
            q, k, v = (x.unsqueeze(0).transpose(1, 2) for x in (query, key, value))
            out = self._attend(q, k, v, allowed[None, None])
            return out.squeeze(0).transpose(0, 1).contiguous()  # [t, h, dv]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, h, s, d]
        if k.shape[1] != q.shape[1]:  # grouped-query attention
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = self._attend(q, k, v, allowed[None, None])
        b, h, s, dv = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, h * dv)

    def _attend_per_segment(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor
    ) -> torch.Tensor:
        """Causal attention inside each packed segment ([t, h, d] in, [t, h, dv] out), one SDPA call
        per segment. On the host reading the boundaries costs no device sync, and the work is the
        sum of the squared segment lengths instead of the square of the whole micro-batch with a
        block mask (measured on the tiny SFT recipe, micro-batches of 2 x 512 tokens: attention went
        from 27% of a step to under 5%). Equal to the masked call to fp32 rounding, not bitwise
        (tests/benchmarks/test_fast_paths.py checks both paths against float64 attention)."""
        bounds = cu_seqlens.tolist()
        outs = []
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            if end > start:
                q, k, v = (x[start:end].unsqueeze(0).transpose(1, 2) for x in (query, key, value))
                outs.append(self._attend(q, k, v, None).squeeze(0).transpose(0, 1))
        return torch.cat(outs).contiguous()

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None
    ) -> torch.Tensor:
        """SDPA with a boolean ``allowed`` mask, or causal attention when ``allowed`` is None."""
        if self.config.qk_clip:
            mask = allowed
            if mask is None:
                mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
            with torch.no_grad():
                logits = torch.matmul(q, k.transpose(-1, -2)).float() * self.softmax_scale
                logits = logits.masked_fill(~mask, float("-inf"))
                per_head = logits.amax(dim=(0, 2, 3))
            prev = self.current_max_attn_logits
            self.current_max_attn_logits = per_head if prev is None else torch.maximum(prev, per_head)
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=allowed,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=allowed is None,
            scale=self.softmax_scale,
        )


def _equal_segments(params: PackedSeqParams, total: int) -> int:
    """The number of segments when all have the same length, else 0, read without a device sync:
    segment lengths sum to ``total`` and none exceeds ``max_seqlen_q``, so ``count * max == total``
    holds exactly when every segment is ``max_seqlen_q`` long."""
    count = params.cu_seqlens_q.numel() - 1
    longest = params.max_seqlen_q
    if not isinstance(longest, int) or count < 1 or count * longest != total:
        return 0
    return count
