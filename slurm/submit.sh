#!/usr/bin/env bash
# Submit one of slurm/*.sbatch with its allocation taken from environment variables, after
# checking on this (login) node that the recipe's layout fits, so a bad layout never queues.
#
#   slurm/submit.sh pretrain_48b [key=value ...]          # 32 x 8 GPUs, the script's defaults
#   NNODES=64 PRETRAIN_STAGE=2 slurm/submit.sh pretrain_48b
#   GPUS_PER_NODE=0 NTASKS_PER_NODE=2 NNODES=1 slurm/submit.sh pretrain_48b   # CPU mode
#   JOB_DEPENDENCY=singleton slurm/submit.sh pretrain_48b # chain: one job of this name at a time
#
# Variables mapped to sbatch flags (unset: the script's #SBATCH default applies):
#   NNODES -> --nodes; GPUS_PER_NODE -> --gpus-per-node and --ntasks-per-node (one task per GPU;
#   0 = CPU mode with NTASKS_PER_NODE tasks per node); CPUS_PER_TASK -> --cpus-per-task;
#   JOB_DEPENDENCY -> --dependency;
#   LOG_ROOT [REPO/runs/slurm] -> --output=LOG_ROOT/%x-%j.out (data_prep: %x-%A_%a.out);
#   data_prep only: the array defaults to one task per file matching INPUT_GLOB;
#   SBATCH_ARGS: any further sbatch flags, whitespace separated.
# Everything else uses sbatch's own input variables, which also beat #SBATCH lines:
#   SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_QOS, SBATCH_TIMELIMIT, SBATCH_JOB_NAME, SBATCH_SIGNAL,
#   SBATCH_RESERVATION, SBATCH_ARRAY_INX, SBATCH_OUTPUT, ... (sbatch(1), INPUT ENVIRONMENT VARIABLES).
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
if [[ -n "${CPUS_PER_TASK:-}" ]]; then flags+=(--cpus-per-task="${CPUS_PER_TASK}"); fi
if [[ -n "${JOB_DEPENDENCY:-}" ]]; then flags+=(--dependency="${JOB_DEPENDENCY}"); fi

is_array=0
if grep -q '^#SBATCH --array' "${script}"; then is_array=1; fi
if [[ "${is_array}" == "1" && -z "${SBATCH_ARRAY_INX:-}" && -n "${INPUT_GLOB:-}" ]]; then
    n_files="$(compgen -G "${INPUT_GLOB}" | wc -l)"
    if [[ "${n_files}" -eq 0 ]]; then
        echo "submit.sh: no files match INPUT_GLOB='${INPUT_GLOB}'" >&2
        exit 2
    fi
    flags+=(--array="0-$((n_files - 1))")
fi

LOG_ROOT="${LOG_ROOT:-${REPO_DIR}/runs/slurm}"
export LOG_ROOT
if [[ -z "${SBATCH_OUTPUT:-}" ]]; then
    if [[ "${is_array}" == "1" ]]; then
        flags+=(--output="${LOG_ROOT}/%x-%A_%a.out")
    else
        flags+=(--output="${LOG_ROOT}/%x-%j.out")
    fi
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
