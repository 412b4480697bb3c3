"""The entry points silence exactly the known dependency warnings, and ``--debug`` keeps them."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import logging, sys, warnings
from joyai_megatron.errors import run_cli

def main(argv):
    warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning)
    warnings.warn("Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning)
    logging.getLogger("megatron.core.models.gpt.gpt_model").warning("GPTModel IS DEPRECATED. ...")
    logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME=x")
    warnings.warn("Distributed training is initialized but no parallel_state is set for <class "
                  "'modelopt.torch.opt.dynamic.QuantMLP'>. Using default parallel_state", UserWarning)
    warnings.warn("`torch.jit.script` is deprecated. Please switch to `torch.compile`", FutureWarning)
    warnings.warn("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use", FutureWarning)
    warnings.warn("transformers 5.23.0 is not tested with current version of modelopt and may", UserWarning)
    warnings.warn("The given buffer is not writable, and PyTorch does not support", UserWarning)
    logging.getLogger("lm_eval.api.task").warning("joyai_demo_math: Custom kwargs can be passed to `--metadata`")
    warnings.warn("a warning nobody has seen before", UserWarning)
    logging.getLogger("megatron.core.models.gpt.gpt_model").warning("another gpt_model warning")
    return 0

logging.basicConfig()
sys.exit(run_cli(main, sys.argv[1:]))
"""
KNOWN = (
    "Apex is not installed",
    "DTensor",
    "GPTModel IS DEPRECATED",
    "No CUDA runtime",
    "no parallel_state",
    "torch.jit.script",
    "reduce_scatter_tensor",
    "not tested with current version of modelopt",
    "not writable",
    "Custom kwargs",
)


def _stderr(*args: str) -> str:
    out = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stderr


def test_known_warnings_are_silenced_and_others_kept() -> None:
    err = _stderr()
    assert not [k for k in KNOWN if k in err], err
    assert "a warning nobody has seen before" in err and "another gpt_model warning" in err


def test_debug_shows_every_warning() -> None:
    err = _stderr("--debug")
    assert all(k in err for k in KNOWN), err


def test_console_script_is_the_module_cli() -> None:
    """``joyai-megatron`` (pyproject's console script) answers like ``python -m joyai_megatron``."""
    from pathlib import Path

    script = Path(sys.executable).with_name("joyai-megatron")
    via_script = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    via_module = subprocess.run(
        [sys.executable, "-m", "joyai_megatron", "--help"], capture_output=True, text=True, timeout=120
    )
    assert via_script.returncode == via_module.returncode == 0, via_script.stderr
    assert via_script.stdout.split("\n", 1)[1] == via_module.stdout.split("\n", 1)[1]
