"""A rank for launcher tests that need no trainer: reports its torch env:// identity, then
waits for SIGUSR1 (as the trainer does) and exits 0, or exits 0 by itself after PROBE_SECONDS."""

import os
import signal
import sys
import time

stop = []
signal.signal(signal.SIGUSR1, lambda signum, frame: stop.append(signum))
keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")
print("probe " + " ".join(f"{k}={os.environ.get(k, '<unset>')}" for k in keys), flush=True)
print(f"probe RANK={os.environ['RANK']} ready", flush=True)
deadline = time.monotonic() + float(os.environ.get("PROBE_SECONDS", "60"))
while not stop and time.monotonic() < deadline:
    time.sleep(0.05)
print(f"probe RANK={os.environ['RANK']} {'got SIGUSR1' if stop else 'timed out'}", flush=True)
sys.exit(0)
