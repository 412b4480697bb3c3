"""The only place that adapts Megatron-Core to this environment (CPU redirects)."""

from joyai_megatron.compat.cpu import (
    apply_cpu_redirects,
    cuda_device_as_cpu,
    redirect_cuda_device,
    redirect_sites,
)

__all__ = ["apply_cpu_redirects", "cuda_device_as_cpu", "redirect_cuda_device", "redirect_sites"]
