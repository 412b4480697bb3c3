"""One OpenMP team per CPU process: helper threads run their tensor ops serially.

On CPU every gloo process group owns worker threads that run its collectives, and those threads
call ATen: an ``all_gather`` copies each gathered tensor out of a flat buffer
(``ProcessGroupGloo``'s allgather work), a ``copy_`` that ATen splits over OpenMP threads when it
is large.  The first such copy makes the gloo thread the master of a second libgomp thread pool,
which lives as long as the process group.  libgomp then manages more threads than there are CPUs
(``gomp_managed_threads > gomp_available_cpus``) and throttles every barrier's spin-wait to ~100
iterations for the rest of the process (``config/linux/wait.h`` ``do_spin``; no environment
variable lifts the throttled count, not ``GOMP_SPINCOUNT`` nor ``OMP_WAIT_POLICY=ACTIVE``).  The
training thread's OpenMP worker now sleeps on a futex between parallel regions: ~5,000 voluntary
context switches per second per thread, 135% CPU instead of 199% on 2 cores, and forward-backward
25-45% slower after the first ``dist_checkpointing.save`` (its metadata ``all_gather_object``
goes through gloo's allgather).  Megatron-Core's checkpoint code and any all-gather larger than
ATen's grain size (32,768 elements) trigger it.

The fix keeps every thread but the one that installs it at one intra-op thread: ATen gives each
thread its intra-op count at its first parallel op (``at::init_num_threads``, from the global
``torch.set_num_threads`` value), so the global value is set to 1 and this thread's own OpenMP
and MKL counts are set back to what they were through the runtimes' per-thread calls
(``omp_set_num_threads`` and ``MKL_Set_Num_Threads_Local``, both thread-local).  CPU only: on a
GPU the training thread does not compute on CPU threads.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

_applied = False


def _loaded_library(stem: str) -> ctypes.CDLL | None:
    """The copy of ``stem`` this process has loaded (torch's bundled libgomp, libtorch_cpu)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if Path(path).name.startswith(stem):
            return ctypes.CDLL(path)
    return None


def serial_helper_threads() -> bool:
    """Give threads other than this one a single intra-op thread, keeping this thread's count;
    returns whether it is in effect.  A no-op with CUDA, with one intra-op thread already, or where
    ATen's parallel backend is not OpenMP."""
    global _applied
    if _applied:
        return True
    threads = torch.get_num_threads()  # also runs ATen's per-thread init here, before the change
    if (
        torch.cuda.is_available()
        or threads == 1
        or "parallel backend: OpenMP" not in torch.__config__.parallel_info()
    ):
        return False
    gomp = _loaded_library("libgomp")
    if gomp is None:
        return False
    torch.set_num_threads(1)
    gomp.omp_set_num_threads(threads)
    if torch.backends.mkl.is_available():
        mkl = _loaded_library("libtorch_cpu.so")
        if mkl is None or not hasattr(mkl, "MKL_Set_Num_Threads_Local"):
            torch.set_num_threads(threads)  # MKL would stay at one thread here: undo
            return False
        mkl.MKL_Set_Num_Threads_Local(threads)
    _applied = True
    return True
