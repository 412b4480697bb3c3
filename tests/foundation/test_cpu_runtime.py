"""The two CPU runtime rows of ``compat.PATCHES``, each shown against the same probe with the row
left out: a gloo all-gather no longer throttles the training thread's OpenMP team
(``compat/threads.py``), and a large product freed and allocated again costs no page faults
(``compat/allocator.py``).  Each probe runs in a fresh interpreter: both rows change process state."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.joyai_helpers import REPO, free_port, scrubbed_env

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="both rows act only without CUDA")

THREADS_PROBE = """
import json, os, resource, sys, threading, torch, torch.distributed as dist
torch.set_num_threads(2)
if sys.argv[1] == "fixed":
    from joyai_megatron.compat.threads import serial_helper_threads
    assert serial_helper_threads()
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
x = torch.ones(1 << 20)

def waits():  # voluntary context switches of the process over 300 two-thread ops
    before = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
    for _ in range(300):
        x.mul_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - before

waits()
first = waits()
# gloo's worker thread copies the gathered 4 MiB out of its flat buffer with an ATen copy_
dist.all_gather([torch.empty(1 << 20)], torch.randn(1 << 20))
after = waits()
helper = {}
thread = threading.Thread(target=lambda: helper.update(threads=torch.get_num_threads()))
thread.start(); thread.join()
print(json.dumps({"before": first, "after": after, "main": torch.get_num_threads(), "helper": helper["threads"]}))
dist.destroy_process_group()
"""

ALLOCATOR_PROBE = """
import json, resource, sys, torch
if sys.argv[1] == "fixed":
    from joyai_megatron.compat.allocator import keep_freed_memory
    assert keep_freed_memory()
a, w = torch.randn(2048, 256), torch.randn(256, 8192)
for _ in range(5):  # a 64 MiB product: above glibc's largest dynamic mmap threshold (32 MiB)
    (a @ w).sum()
faults = []
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    (a @ w).sum()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": sorted(faults)[3]}))  # the median product
"""


def _probe(code: str, *args: str) -> dict:
    env = scrubbed_env(PYTHONPATH=str(REPO))
    env.pop("OMP_NUM_THREADS", None)
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_gloo_all_gather_leaves_the_training_threads_team_spinning() -> None:
    unfixed = _probe(THREADS_PROBE, "unfixed", str(free_port()))
    # the mechanism this row exists for: after the all-gather the worker sleeps between ops
    assert unfixed["after"] > 100 and unfixed["after"] > 10 * max(unfixed["before"], 1), unfixed
    fixed = _probe(THREADS_PROBE, "fixed", str(free_port()))
    assert fixed["after"] < 50, fixed
    assert fixed["main"] == 2 and fixed["helper"] == 1, fixed


def test_a_freed_large_product_is_reused_without_page_faults() -> None:
    unfixed = _probe(ALLOCATOR_PROBE, "unfixed")
    assert unfixed["faults"] > (64 << 20) // 4096 // 2, unfixed  # each product faults its pages in afresh
    fixed = _probe(ALLOCATOR_PROBE, "fixed")
    assert fixed["faults"] < 200, fixed
