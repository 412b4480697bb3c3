"""Scripts that run inside the sandbox (standard library only; see ../run.py)."""
