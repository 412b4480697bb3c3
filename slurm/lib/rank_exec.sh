#!/usr/bin/env bash
# Runs once per srun task: turns Slurm's task identity into the torch `env://` variables, then
# replaces itself with the real command, so signals that srun forwards reach Python directly.
#
#   srun ... bash slurm/lib/rank_exec.sh python -m joyai_megatron pretrain RECIPE ...
set -euo pipefail

if [[ $# -eq 0 ]]; then
    echo "rank_exec.sh: no command given" >&2
    exit 2
fi
: "${SLURM_PROCID:?rank_exec.sh must run under srun (SLURM_PROCID is unset)}"

export RANK="${SLURM_PROCID}"
export WORLD_SIZE="${SLURM_NTASKS:?SLURM_NTASKS is unset}"
export LOCAL_RANK="${SLURM_LOCALID:?SLURM_LOCALID is unset}"
export NODE_RANK="${SLURM_NODEID:-0}"
# The launcher exports JM_RANKS_PER_NODE; fall back to Slurm's view for a hand-written srun.
export LOCAL_WORLD_SIZE="${JM_RANKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-1}}"
: "${MASTER_ADDR:?MASTER_ADDR is unset (the launcher sets it from the node list)}"
: "${MASTER_PORT:?MASTER_PORT is unset}"

exec "$@"
