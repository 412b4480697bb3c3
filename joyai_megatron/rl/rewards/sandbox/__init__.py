"""Sandboxed execution of model-written Python for the code rewards (docs/rl.md, section 10)."""

from joyai_megatron.rl.rewards.sandbox.isolation import (
    SandboxUnavailableError,
    bubblewrap_available,
    set_unsafe_code_execution,
    unsafe_code_execution,
)
from joyai_megatron.rl.rewards.sandbox.run import (
    ProgramRun,
    SandboxResult,
    run_python_program,
    run_python_tests,
)

__all__ = [
    "ProgramRun",
    "SandboxResult",
    "SandboxUnavailableError",
    "bubblewrap_available",
    "run_python_program",
    "run_python_tests",
    "set_unsafe_code_execution",
    "unsafe_code_execution",
]
