"""Code verifier throughput: verified programs per second with the sandbox's isolation on vs off.

Both modes score the same programs through ``rewards/pool.py``'s pool (``--workers``, default one
per core) with the judge / solution split and the same limits; "on" adds bubblewrap (read-only
view, private tmpfs, PID / network namespaces, a fresh uid per process), "off" is the unsafe
opt-in (``rl.unsafe_code_execution``). The workload is typical of code RL: small functions with a
few asserts, half of them wrong. The modes alternate for ``--rounds`` rounds after a warm-up and
each reports its best round; the verdicts of both must agree. A sequential run (one worker,
isolation on) shows what the pool buys.

Usage: ``python benchmarks/code_sandbox.py [--programs 64] [--rounds 2] [--workers N]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

from joyai_megatron.rl.rewards.pool import default_workers, score_all  # noqa: E402
from joyai_megatron.rl.rewards.sandbox import run_python_tests, unsafe_code_execution  # noqa: E402

# (right solution, wrong solution, tests)
PROBLEMS = [
    (
        "def add(a, b):\n    return a + b\n",
        "def add(a, b):\n    return a - b\n",
        "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n",
    ),
    (
        "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
        "def fib(n):\n    return n\n",
        "assert [fib(i) for i in range(10)] == [0, 1, 1, 2, 3, 5, 8, 13, 21, 34]\nassert fib(50) == 12586269025\n",
    ),
    (
        "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))\n",
        "def is_prime(n):\n    return n % 2 == 1\n",
        "assert [n for n in range(30) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]\n",
    ),
    (
        "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n"
        "        self.items.append(x)\n    def pop(self):\n        return self.items.pop()\n",
        "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n"
        "        self.items.insert(0, x)\n    def pop(self):\n        return self.items.pop()\n",
        "s = Stack()\ns.push(1)\ns.push(2)\nassert s.pop() == 2 and s.pop() == 1\n",
    ),
]


def workload(programs: int) -> list[tuple[str, str, bool]]:
    """(program, tests, expected verdict), alternating right and wrong answers over the problems."""
    out = []
    for i in range(programs):
        right, wrong, tests = PROBLEMS[(i // 2) % len(PROBLEMS)]
        out.append((right if i % 2 == 0 else wrong, tests, i % 2 == 0))
    return out


def measure(jobs: list[tuple[str, str, bool]], isolated: bool, workers: int) -> tuple[float, list[float]]:
    """(programs per second, verdicts) of one pass over ``jobs``."""

    def verify(program: str, tests: str) -> float:
        return float(
            run_python_tests(program, tests, timeout_s=10.0, memory_mb=512, isolated=isolated).passed
        )

    start = time.perf_counter()
    verdicts = score_all([(verify, program, tests) for program, tests, _ in jobs], workers)
    return len(jobs) / (time.perf_counter() - start), verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=default_workers())
    args = parser.parse_args()
    jobs = workload(args.programs)
    expected = [float(ok) for _, _, ok in jobs]
    best = {"on": 0.0, "off": 0.0}
    with unsafe_code_execution():
        measure(jobs[:8], True, args.workers)  # warm-up: bubblewrap probe, page cache
        measure(jobs[:8], False, args.workers)
        for _ in range(args.rounds):
            for mode in ("on", "off"):
                rate, verdicts = measure(jobs, mode == "on", args.workers)
                assert verdicts == expected, f"isolation {mode}: verdicts differ from the expected ones"
                best[mode] = max(best[mode], rate)
                print(f"isolation {mode:>3}: {rate:7.1f} programs/s ({args.workers} workers)", flush=True)
    sequential, _ = measure(jobs, True, 1)
    ratio = best["on"] / best["off"]
    print(
        f"isolation on, 1 worker: {sequential:7.1f} programs/s (pool speed-up {best['on'] / sequential:.2f}x)"
    )
    print(
        f"isolation on / off: {ratio:.2f}x ({best['on']:.1f} vs {best['off']:.1f} programs/s, best of {args.rounds})"
    )
    print(json.dumps({"workers": args.workers, "on": best["on"], "off": best["off"], "ratio": ratio,
                      "on_sequential": sequential, "programs": args.programs}))  # fmt: skip


if __name__ == "__main__":
    main()
