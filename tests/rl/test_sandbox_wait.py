"""The verifier's wait works in a process that holds many files (a trainer: checkpoints, datasets,
sockets): ``select()`` refused descriptors >= 1024 and failed a code-reward step in the full suite."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

from joyai_megatron.rl.rewards.sandbox import run


def test_wait_with_descriptors_above_1024() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard open-file limit ({hard}) is below 1200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        assert max(held) >= 1024
        quick = subprocess.Popen([sys.executable, "-c", "pass"])
        assert run._wait(quick, 30) is False  # exited, not timed out
        slow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            assert run._wait(slow, 0.2) is True  # the wall clock ran out
        finally:
            slow.kill()
            slow.wait()
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
