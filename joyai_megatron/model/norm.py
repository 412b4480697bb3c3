"""RMSNorm for the ``local`` backend that works with sequence parallelism.

Megatron-Core's torch fallback (``WrappedTorchNorm``) refuses sequence parallelism, which
Megatron-Core requires whenever MoE meets tensor parallelism.  With sequence parallelism a norm
sees only its rank's slice of the sequence, so its weight gradient is partial: marking the weight
``sequence_parallel`` makes ``finalize_model_grads`` all-reduce it over the TP group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


class LocalRMSNorm(torch.nn.Module):
    """y = x / rms(x) * weight, computed in fp32 like DeepSeek-V3's reference RMSNorm."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_: object) -> None:
        super().__init__()
        if config.normalization != "RMSNorm":
            raise ValueError(f"LocalRMSNorm serves normalization='RMSNorm', got {config.normalization!r}")
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return out.to(x.dtype)
