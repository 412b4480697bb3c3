#!/usr/bin/env bash
# Submit one of slurm/*.sbatch with its allocation taken from environment variables, after
# checking on this (login) node that the recipe's layout fits, so a bad layout never queues.
#
#   slurm/submit.sh pretrain_48b [key=value ...]          # 32 x 8 GPUs, the script's defaults
#   NNODES=64 PRETRAIN_STAGE=2 slurm/submit.sh pretrain_48b
#   GPUS_PER_NODE=0 NTASKS_PER_NODE=2 NNODES=1 slurm/submit.sh pretrain_48b   # CPU mode
#   DEPENDENCY=singleton slurm/submit.sh pretrain_48b     # chain: one job of this name at a time
#
# Variables that become sbatch flags (unset: the script's #SBATCH default applies):
#   NNODES -> --nodes; GPUS_PER_NODE -> --gpus-per-node and --ntasks-per-node (one task per GPU;
#   0 = CPU mode with NTASKS_PER_NODE tasks); TIME -> --time; PARTITION -> --partition;
#   ACCOUNT -> --account; QOS -> --qos; JOB_NAME -> --job-name; DEPENDENCY -> --dependency;
#   SIGNAL_SECS -> --signal=B:USR1@SIGNAL_SECS; ARRAY -> --array (data_prep: default one task per
#   file of INPUT_GLOB); LOG_ROOT -> --output=LOG_ROOT/%x-%j.out; SBATCH_ARGS: more flags.
# Set SUBMIT_PREFLIGHT=0 to skip the submit-time check (the job still runs its own unless
# SKIP_PREFLIGHT=1). DRY_RUN=1 prints the sbatch command instead of submitting.
# Prints the job id on stdout (sbatch --parsable); everything else goes to stderr.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export REPO_DIR

if [[ $# -lt 1 ]]; then
    echo "usage: slurm/submit.sh SCRIPT [key=value ...]   (SCRIPT: pretrain_48b, sft_48b, ... or a path)" >&2
    exit 2
fi
script="$1"
shift
if [[ ! -f "${script}" ]]; then
    script="${REPO_DIR}/slurm/${script%.sbatch}.sbatch"
fi
if [[ ! -f "${script}" ]]; then
    echo "submit.sh: no such sbatch script: $1 (see ${REPO_DIR}/slurm/)" >&2
    exit 2
fi

flags=()
if [[ -n "${NNODES:-}" ]]; then flags+=(--nodes="${NNODES}"); fi
if [[ -n "${GPUS_PER_NODE:-}" ]]; then
    if [[ "${GPUS_PER_NODE}" == "0" ]]; then
        flags+=(--gpus-per-node=0 --ntasks-per-node="${NTASKS_PER_NODE:-1}")
    else
        flags+=(--gpus-per-node="${GPUS_PER_NODE}" --ntasks-per-node="${GPUS_PER_NODE}")
    fi
fi
if [[ -n "${TIME:-}" ]]; then flags+=(--time="${TIME}"); fi
if [[ -n "${PARTITION:-}" ]]; then flags+=(--partition="${PARTITION}"); fi
if [[ -n "${ACCOUNT:-}" ]]; then flags+=(--account="${ACCOUNT}"); fi
if [[ -n "${QOS:-}" ]]; then flags+=(--qos="${QOS}"); fi
if [[ -n "${JOB_NAME:-}" ]]; then flags+=(--job-name="${JOB_NAME}"); fi
if [[ -n "${DEPENDENCY:-}" ]]; then flags+=(--dependency="${DEPENDENCY}"); fi
if [[ -n "${SIGNAL_SECS:-}" ]]; then flags+=(--signal="B:USR1@${SIGNAL_SECS}"); fi

is_array=0
if grep -q '^#SBATCH --array' "${script}"; then is_array=1; fi
if [[ -n "${ARRAY:-}" ]]; then
    flags+=(--array="${ARRAY}")
elif [[ "${is_array}" == "1" && -n "${INPUT_GLOB:-}" ]]; then
    n_files="$(compgen -G "${INPUT_GLOB}" | wc -l)"
    if [[ "${n_files}" -eq 0 ]]; then
        echo "submit.sh: no files match INPUT_GLOB='${INPUT_GLOB}'" >&2
        exit 2
    fi
    flags+=(--array="0-$((n_files - 1))")
fi

LOG_ROOT="${LOG_ROOT:-${REPO_DIR}/runs/slurm}"
export LOG_ROOT
if [[ "${is_array}" == "1" ]]; then
    flags+=(--output="${LOG_ROOT}/%x-%A_%a.out")
else
    flags+=(--output="${LOG_ROOT}/%x-%j.out")
fi
if [[ -n "${SBATCH_ARGS:-}" ]]; then
    read -r -a extra <<<"${SBATCH_ARGS}"
    flags+=("${extra[@]}")
fi

if [[ "${SUBMIT_PREFLIGHT:-1}" == "1" && "${SKIP_PREFLIGHT:-0}" != "1" && "${DRY_RUN:-0}" != "1" ]]; then
    # The sbatch script itself in PREFLIGHT_ONLY mode: same recipe choice and overrides as the job.
    nodes="${NNODES:-$(sed -n 's/^#SBATCH --nodes=\([0-9][0-9]*\).*/\1/p' "${script}")}"
    if ! preflight_log="$(PREFLIGHT_ONLY=1 NNODES="${nodes:-1}" bash "${script}" "$@" 2>&1)"; then
        printf '%s\n' "${preflight_log}" >&2
        echo "submit.sh: preflight failed; nothing was submitted" >&2
        exit 1
    fi
    grep -E 'layout:|preflight' <<<"${preflight_log}" >&2 || true
fi

cmd=(sbatch --parsable "${flags[@]}" "${script}" "$@")
printf '+ %s\n' "${cmd[*]}" >&2
if [[ "${DRY_RUN:-0}" == "1" ]]; then
    exit 0
fi
mkdir -p "${LOG_ROOT}"
"${cmd[@]}"
