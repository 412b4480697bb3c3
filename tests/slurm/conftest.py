"""Session fixtures for tests/slurm: Slurm tools (installed if missing) and a live cluster."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from tests.slurm.slurmci import SETUP_SCRIPT, SlurmCluster


@pytest.fixture(scope="session")
def slurm_tools() -> None:
    """Slurm client/daemon tools and shellcheck on PATH, installed with apt-get if needed."""
    proc = subprocess.run(["bash", str(SETUP_SCRIPT)], capture_output=True, text=True, timeout=1200)
    if proc.returncode == 2:
        pytest.skip(f"Slurm packages cannot be installed here: {proc.stderr.strip()}")
    if proc.returncode != 0:
        pytest.fail(f"setup_slurm.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


@pytest.fixture(scope="session")
def slurm_cluster(slurm_tools: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Exception:
        cluster.stop()
        raise
    try:
        yield cluster
    finally:
        cluster.stop()
