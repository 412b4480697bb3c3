"""Dependency warnings every run prints that tell a user nothing, silenced at our entry points.

A newcomer's first run should show our log lines and real warnings only.  Each entry below is a
message that fires on every run of a supported setup (CPU without TE/Apex, or Megatron-Core's own
deprecation notes for APIs we call as intended) and is matched by its exact text, so a new or
different warning still shows.  ``--debug`` / ``JOYAI_DEBUG=1`` keeps them all.
"""

from __future__ import annotations

import logging
import re
import warnings

# (category, message regex, why it says nothing)
_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (UserWarning, r"Transformer Engine and Apex are not installed\. Falling back", "CPU / local backend by design"),
    (UserWarning, r"Apex is not installed\. Falling back to Torch Norm", "CPU / local backend by design"),
    (UserWarning, r"MimoModelConfig is experimental", "import side effect of a module we do not use"),
    (UserWarning, r"torch\.distributed is disabled, unavailable or uninitialized", "one-process checkpoint reads"),
    (UserWarning, r"The argument order of load has been changed", "Megatron-Core's dist_checkpointing call"),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor", "torch_dist format"),
    (FutureWarning, r"`torch\.jit\.script` is deprecated", "ModelOpt's import-time scripting"),
    (
        FutureWarning,
        r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
        "Megatron-Core's collectives (context parallelism, ZeRO-1)",
    ),
    (
        UserWarning,
        r"Distributed training is initialized but no parallel_state is set for <class 'modelopt\.",
        "ModelOpt's QAT modules at TP=1",
    ),
    (UserWarning, r"The given buffer is not writable", "ModelOpt's restore of its saved state"),
    (
        UserWarning,
        r"transformers [0-9.]+ is not tested with current version of modelopt",
        "the pinned pair, exported and reloaded in tests/stages/test_qat.py",
    ),
)

# logger name -> message regexes
_LOG_RECORDS: dict[str, tuple[str, ...]] = {
    "torch.utils.cpp_extension": (r"No CUDA runtime is found",),  # CPU machines
    "megatron.core.models.gpt.gpt_model": (r"GPTModel IS DEPRECATED",),  # JoyAI's MTP needs GPTModel
    "megatron.core.dist_checkpointing.strategies.torch": (r"MCore's async save is deprecated",),
    "lm_eval.api.task": (r"Custom kwargs can be passed to `--metadata`",),  # every local task
}


class _DropMatching(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def silence_known_warnings() -> None:
    """Install the filters for this process (idempotent)."""
    for category, message, _why in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, patterns in _LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) for f in logger.filters):
            logger.addFilter(_DropMatching(patterns))
