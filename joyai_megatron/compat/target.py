"""Check a GPU job's Megatron-Core config on a machine without Transformer Engine.

Megatron-Core's ``TransformerConfig.__post_init__`` gates FP8, fused MoE permutation and selective
recompute of MoE activations on Transformer Engine being installed:

* the TE version, ``megatron.core.utils.get_te_version`` (utils.py l.295-323, cached in the module
  global ``_te_version``; ``transformer_config.py`` imports the function by name), and
* for ``moe_permute_fusion``, TE's permutation kernels, which ``moe/moe_utils.py`` imports at load
  time and leaves as ``None`` without TE (transformer_config.py l.2651-2667 checks them).

On a login node or a CPU CI machine TE is absent, so every production recipe would be rejected for
the wrong reason.  :func:`assume_transformer_engine` makes those two facts read as on the GPU job for
the duration of a check, then restores them; with TE installed it changes nothing.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from typing import Any

from megatron.core import utils as mcore_utils
from megatron.core.transformer.moe import moe_utils
from packaging.version import Version

# The Transformer Engine release the GPU path is verified with (requirements-gpu.txt pins it; a test
# keeps the two equal).
TE_VERSION = "2.12.0"

_TE_PERMUTE_KERNELS = (
    "fused_permute",
    "fused_permute_with_probs",
    "fused_sort_chunks_by_index",
    "fused_sort_chunks_by_index_with_probs",
    "fused_unpermute",
)


def _kernel_stand_in(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("a Transformer Engine kernel stand-in was called outside a config check")


@contextlib.contextmanager
def assume_transformer_engine(version: str = TE_VERSION) -> Iterator[None]:
    if importlib.util.find_spec("transformer_engine") is not None:
        yield
        return
    saved_version = mcore_utils._te_version
    saved_kernels = {name: getattr(moe_utils, name) for name in _TE_PERMUTE_KERNELS}
    mcore_utils._te_version = Version(version)
    for name, kernel in saved_kernels.items():
        if kernel is None:
            setattr(moe_utils, name, _kernel_stand_in)
    try:
        yield
    finally:
        mcore_utils._te_version = saved_version
        for name, kernel in saved_kernels.items():
            setattr(moe_utils, name, kernel)
