"""glibc keeps freed tensor memory in the heap on CPU instead of returning it to the kernel.

glibc serves allocations above its mmap threshold (128 KiB at start, raised dynamically up to
32 MiB as large blocks are freed, so never for the logits) with fresh ``mmap`` pages and trims
the heap top back to the kernel above 128 KiB of free space.  A CPU training step allocates and
frees the same activation and gradient sizes every micro-batch, so each step pays zero-fill page
faults again: on the demo's SFT recipe ~100,000 minor faults per second and 11 s of system time in
60 steps; 0 faults per second and 3 s with the two thresholds fixed at 1 GiB (``mallopt`` = ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_``, set at run time so that no launcher needs them in its environment).
The cost is memory: the process keeps its peak heap until it exits, as PyTorch's CUDA caching
allocator does on a GPU.  CPU only (glibc on Linux); on a GPU, tensors do not live in this heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch

# glibc malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Above the logits of a CPU micro-batch (2 x 512 tokens x the demo vocabulary in fp32 is ~130 MiB)
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 1 << 30

_applied = False


def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds (no CUDA, glibc only); returns whether they are set."""
    global _applied
    if _applied:
        return True
    if torch.cuda.is_available():
        return False
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    _applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    return _applied
