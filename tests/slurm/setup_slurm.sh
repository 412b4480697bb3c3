#!/usr/bin/env bash
# Install the Slurm daemons, client tools and shellcheck that tests/slurm needs (Debian/Ubuntu).
# Idempotent: does nothing when every tool is already on PATH. Exits 0 on success, 2 when the
# packages cannot be installed here (no apt, not root, no network), printing why.
set -euo pipefail

needed=(slurmctld slurmd sbatch squeue scontrol scancel sinfo shellcheck)
missing=()
for tool in "${needed[@]}"; do
    command -v "${tool}" >/dev/null 2>&1 || missing+=("${tool}")
done
if [[ ${#missing[@]} -eq 0 ]]; then
    echo "setup_slurm: all tools present"
    exit 0
fi
echo "setup_slurm: missing ${missing[*]}; installing with apt-get"

if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_slurm: apt-get not found; install slurm-wlm and shellcheck by hand" >&2
    exit 2
fi
if [[ "$(id -u)" -ne 0 ]]; then
    echo "setup_slurm: not root; run: apt-get install -y slurm-wlm slurmctld slurmd slurm-client shellcheck" >&2
    exit 2
fi

export DEBIAN_FRONTEND=noninteractive
if ! apt-get update -q; then
    echo "setup_slurm: apt-get update failed (no network to the package mirror?)" >&2
    exit 2
fi
# --no-install-recommends keeps munge etc. out; the test cluster runs with auth/none.
if ! apt-get install -y -q --no-install-recommends \
    slurm-wlm slurmctld slurmd slurm-client shellcheck; then
    echo "setup_slurm: apt-get install failed" >&2
    exit 2
fi
echo "setup_slurm: installed"
