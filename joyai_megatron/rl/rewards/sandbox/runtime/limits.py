"""Process limits every sandboxed process applies to itself before it runs any untrusted input.

Standard library only (runs inside the sandbox). Started as root inside bubwrap, a process first
becomes a fresh unprivileged uid: that drops every capability, and it is what makes RLIMIT_NPROC
count: the kernel does not enforce it for uid 0, and a uid of its own gives each run its own count.
"""

from __future__ import annotations

import os
import resource


def apply_limits(config: dict) -> None:
    """Switch to ``config["uid"]`` (if set) and set the memory, CPU, file-size and process caps."""
    uid = config.get("uid")
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    caps = [
        (resource.RLIMIT_AS, config["memory_bytes"]),
        (resource.RLIMIT_CPU, config["cpu_seconds"]),
        (resource.RLIMIT_FSIZE, config["file_bytes"]),
        (resource.RLIMIT_NPROC, config["processes"]),
        (resource.RLIMIT_CORE, 0),
    ]
    for limit, value in caps:
        resource.setrlimit(limit, (value, value))
