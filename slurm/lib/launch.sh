# shellcheck shell=bash
# Shared launcher for slurm/*.sbatch (sourced, never executed). See docs/slurm.md.
#
# Launch model: one srun task per GPU (CPU mode: NTASKS_PER_NODE tasks per node). Each task's
# RANK / WORLD_SIZE / LOCAL_RANK come from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID
# (slurm/lib/rank_exec.sh). Chosen over torchrun-per-node because
#   - srun forwards signals straight to every rank, so SIGUSR1 -> checkpoint -> exit 0 needs no
#     agent in between (torchrun's elastic agent turns SIGTERM into a shutdown of its workers and
#     has no SIGUSR1 relay);
#   - Slurm already knows every rank: --kill-on-bad-exit stops the whole step when one rank dies,
#     per-rank output is labelled, and there is no second rendezvous (c10d store) to configure;
#   - the same line works with pyxis containers, where a per-node agent would need its own image.
#
# Environment knobs (all optional; defaults in brackets):
#   DRY_RUN [0]            1: print every command (env, preflight, srun, requeue) and run none
#   PREFLIGHT_ONLY [0]     1: like DRY_RUN, but run the preflight for real and exit after it
#                          (slurm/submit.sh does this on the login node before sbatch)
#   PYTHON [python]        interpreter on the nodes (the container's when CONTAINER_IMAGE is set)
#   GPUS_PER_NODE [8]      0 = CPU mode: gloo, NTASKS_PER_NODE ranks per node, tiny_cpu recipes
#   NTASKS_PER_NODE        CPU mode ranks per node [SLURM_NTASKS_PER_NODE or 1]
#   NNODES                 nodes to use [SLURM_JOB_NUM_NODES]
#   MASTER_ADDR / MASTER_PORT   rendezvous [first node of SLURM_JOB_NODELIST / from the job id]
#   LOG_ROOT [REPO_DIR/runs/slurm]   per-job log directory LOG_ROOT/<job name>-<job id>/
#   CONTAINER_IMAGE, CONTAINER_MOUNTS, PYXIS_CONTAINER_NAME   pyxis/enroot; flags only when the image is set
#   SRUN_ARGS              extra srun flags, whitespace separated
#   SKIP_PREFLIGHT [0]     1: do not run `python -m joyai_megatron plan` before srun
#   PLAN_ARGS              extra planner flags, e.g. "--gpu-memory-gb 141" on H200 nodes
#   MAX_RESTARTS [10]      requeues after SIGUSR1 before the job stops and asks for a resubmit
#   NCCL_NVLS_ENABLE [0], NCCL_DEBUG [WARN], TORCH_NCCL_ASYNC_ERROR_HANDLING [1],
#   CUDA_DEVICE_MAX_CONNECTIONS [1], OMP_NUM_THREADS [SLURM_CPUS_PER_TASK or 1]

# Exit status when the ranks stopped cleanly at a checkpoint but the job was not requeued
# (MAX_RESTARTS reached or requeue refused): EX_TEMPFAIL, "try again", so that
# `--dependency=afterok` chains do not start the next stage on an unfinished run.
JM_EXIT_RESUBMIT=75

jm_log() {
    printf '[joyai-slurm %s] %s\n' "$(date +%H:%M:%S)" "$*"
}

jm_die() {
    jm_log "ERROR: $*" >&2
    exit 1
}

jm_is_dry_run() {
    [[ "${DRY_RUN:-0}" == "1" || "${PREFLIGHT_ONLY:-0}" == "1" ]]
}

# A command as one shell-quoted line that can be pasted back into a shell.
jm_quote() {
    local quoted=() arg
    for arg in "$@"; do
        quoted+=("$(printf '%q' "${arg}")")
    done
    printf '%s' "${quoted[*]}"
}

# Print a command; run it unless DRY_RUN=1.
jm_run() {
    printf '+ %s\n' "$(jm_quote "$@")"
    if jm_is_dry_run; then
        return 0
    fi
    "$@"
}

# Export VAR=VALUE and print it, so DRY_RUN shows the launch environment too.
jm_export() {
    export "$1=$2"
    printf '+ export %s=%s\n' "$1" "$(printf '%q' "$2")"
}

# Expand a Slurm hostlist ("gpu[001-004,010],login1") into one host per line. scontrol is
# authoritative, but needs a slurm.conf; the pure-bash fallback covers the usual forms
# (prefix[a-b,c]suffix, nested ranges such as rack[1-2]-n[01-02], zero padding) so DRY_RUN
# works on a laptop.
jm_expand_hostlist() {
    local list="$1"
    # (scontrol retries for 60 s when SLURM_CONF names a missing file, hence the guard.)
    if command -v scontrol >/dev/null 2>&1 && [[ -z "${SLURM_CONF:-}" || -f "${SLURM_CONF}" ]] &&
        timeout 20 scontrol show hostnames "${list}" 2>/dev/null; then
        return 0
    fi
    local item="" depth=0 i ch
    for ((i = 0; i < ${#list}; i++)); do
        ch="${list:i:1}"
        case "${ch}" in
            "[") depth=$((depth + 1)) ;;
            "]") depth=$((depth - 1)) ;;
        esac
        if [[ "${ch}" == "," && ${depth} -eq 0 ]]; then
            [[ -n "${item}" ]] && _jm_expand_one "${item}"
            item=""
        else
            item+="${ch}"
        fi
    done
    if [[ -n "${item}" ]]; then
        _jm_expand_one "${item}"
    fi
}

_jm_expand_one() {
    local host="$1"
    if [[ "${host}" != *"["* ]]; then
        printf '%s\n' "${host}"
        return 0
    fi
    local prefix="${host%%\[*}" rest="${host#*\[}"
    local ranges="${rest%%\]*}" suffix="${rest#*\]}"
    local range lo hi width n parts
    IFS=',' read -r -a parts <<<"${ranges}"
    for range in "${parts[@]}"; do
        lo="${range%%-*}"
        hi="${range#*-}"
        width=${#lo}
        if [[ ! "${lo}" =~ ^[0-9]+$ || ! "${hi}" =~ ^[0-9]+$ ]]; then
            jm_die "cannot parse hostlist range '${range}' in '${host}'"
        fi
        for ((n = 10#${lo}; n <= 10#${hi}; n++)); do
            _jm_expand_one "${prefix}$(printf '%0*d' "${width}" "${n}")${suffix}"
        done
    done
}

# Resolve the repository, the interpreter and the trap handlers; call first.
jm_init() {
    : "${REPO_DIR:?REPO_DIR is unset}"
    PYTHON="${PYTHON:-python}"
    MAX_RESTARTS="${MAX_RESTARTS:-10}"
    JM_RESTART_COUNT="${SLURM_RESTART_COUNT:-0}"
    JM_JOB_ID="${SLURM_JOB_ID:-local-$$}"
    JM_JOB_NAME="${SLURM_JOB_NAME:-joyai}"
    JM_STOP_REQUESTED=0
    JM_SRUN_PID=""
    cd "${REPO_DIR}" || jm_die "cannot cd to REPO_DIR=${REPO_DIR}"
    # `python -m joyai_megatron` must import this checkout even when it is not pip-installed.
    export PYTHONPATH="${REPO_DIR}${PYTHONPATH:+:${PYTHONPATH}}"
    if ! jm_is_dry_run; then
        trap _jm_on_usr1 USR1
        trap _jm_on_term TERM
    fi
}

# --signal=B:USR1@secs reaches only this batch shell; pass it on to the ranks through srun.
_jm_on_usr1() {
    if [[ -z "${JM_SRUN_PID}" ]]; then
        JM_STOP_REQUESTED=1
        jm_log "SIGUSR1 before the ranks started: will not launch them; requeueing instead"
    elif kill -0 "${JM_SRUN_PID}" 2>/dev/null; then
        if [[ "${JM_STOP_REQUESTED}" == "0" ]]; then
            JM_STOP_REQUESTED=1
            jm_log "SIGUSR1: forwarding to srun (pid ${JM_SRUN_PID}); ranks save a checkpoint and exit"
            kill -USR1 "${JM_SRUN_PID}" || true
        fi
    else
        jm_log "SIGUSR1 after the ranks finished: nothing to stop"
    fi
}

# scancel / time limit / preemption: Slurm sends SIGTERM to every rank itself. The shell stays
# alive until srun returns, so the ranks' final checkpoint is not cut short by the job ending.
_jm_on_term() {
    jm_log "SIGTERM: Slurm is signalling the ranks directly; waiting for them to save and exit"
}

# Nodes, ranks, rendezvous, log directory and the launch environment.
jm_setup() {
    GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
    NNODES="${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}"
    if [[ ! "${GPUS_PER_NODE}" =~ ^[0-9]+$ ]]; then
        jm_die "GPUS_PER_NODE must be a non-negative integer, got '${GPUS_PER_NODE}'"
    fi
    if [[ "${GPUS_PER_NODE}" -gt 0 ]]; then
        JM_MODE="gpu"
        RANKS_PER_NODE="${GPUS_PER_NODE}"
    else
        JM_MODE="cpu"
        RANKS_PER_NODE="${NTASKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-1}}"
    fi
    if [[ ! "${NNODES}" =~ ^[1-9][0-9]*$ || ! "${RANKS_PER_NODE}" =~ ^[1-9][0-9]*$ ]]; then
        jm_die "need positive node and rank counts, got NNODES='${NNODES}' ranks/node='${RANKS_PER_NODE}'"
    fi
    WORLD_SIZE=$((NNODES * RANKS_PER_NODE))

    local nodelist="${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}"
    if [[ -n "${nodelist}" ]]; then
        mapfile -t JM_HOSTS < <(jm_expand_hostlist "${nodelist}")
    elif jm_is_dry_run; then
        # Outside an allocation (DRY_RUN / PREFLIGHT_ONLY on a login node): name the nodes.
        nodelist="<not in an allocation>"
        local n
        JM_HOSTS=()
        for ((n = 0; n < NNODES; n++)); do JM_HOSTS+=("node${n}"); done
    else
        mapfile -t JM_HOSTS < <(hostname)
        nodelist="${JM_HOSTS[0]}"
    fi
    if [[ ${#JM_HOSTS[@]} -lt ${NNODES} ]]; then
        jm_die "NNODES=${NNODES} but the allocation '${nodelist}' has ${#JM_HOSTS[@]} node(s)"
    fi
    MASTER_ADDR="${MASTER_ADDR:-${JM_HOSTS[0]}}"
    # Distinct per job and per restart: two jobs sharing a node, or a requeued job landing on the
    # same master while the old socket sits in TIME_WAIT, must not collide.
    local job_num="${SLURM_JOB_ID:-0}"
    [[ "${job_num}" =~ ^[0-9]+$ ]] || job_num=0
    MASTER_PORT="${MASTER_PORT:-$((20000 + (job_num * 7 + JM_RESTART_COUNT * 101) % 30000))}"

    LOG_ROOT="${LOG_ROOT:-${REPO_DIR}/runs/slurm}"
    JOB_LOG_DIR="${JOB_LOG_DIR:-${LOG_ROOT}/${JM_JOB_NAME}-${JM_JOB_ID}}"

    jm_log "job ${JM_JOB_ID} (${JM_JOB_NAME}) restart ${JM_RESTART_COUNT}/${MAX_RESTARTS} repo ${REPO_DIR}"
    jm_log "layout: ${NNODES} node(s) x ${RANKS_PER_NODE} rank(s)/node = world size ${WORLD_SIZE} (${JM_MODE} mode)"
    local node
    for ((node = 0; node < NNODES; node++)); do
        jm_log "  node ${JM_HOSTS[node]} NODE_RANK ${node}: RANK $((node * RANKS_PER_NODE))-$(((node + 1) * RANKS_PER_NODE - 1)) LOCAL_RANK 0-$((RANKS_PER_NODE - 1))"
    done
    jm_log "log directory ${JOB_LOG_DIR}"
    jm_run mkdir -p "${JOB_LOG_DIR}"

    jm_export MASTER_ADDR "${MASTER_ADDR}"
    jm_export MASTER_PORT "${MASTER_PORT}"
    jm_export JM_RANKS_PER_NODE "${RANKS_PER_NODE}"
    jm_export OMP_NUM_THREADS "${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
    if [[ "${JM_MODE}" == "gpu" ]]; then
        # NVLink SHARP / multicast off unless asked: it needs fabric-manager multicast support
        # and fails at communicator init on nodes without it.
        jm_export NCCL_NVLS_ENABLE "${NCCL_NVLS_ENABLE:-0}"
        jm_export NCCL_DEBUG "${NCCL_DEBUG:-WARN}"
        jm_export TORCH_NCCL_ASYNC_ERROR_HANDLING "${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
        # Megatron's TP/SP communication overlap relies on a single hardware queue.
        jm_export CUDA_DEVICE_MAX_CONNECTIONS "${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
    else
        # No CUDA in CPU mode: the trainer picks gloo.
        jm_export CUDA_VISIBLE_DEVICES ""
    fi

    JM_CONTAINER_ARGS=()
    if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
        local mounts="${REPO_DIR}:${REPO_DIR}"
        if [[ -n "${CONTAINER_MOUNTS:-}" ]]; then
            mounts+=",${CONTAINER_MOUNTS}"
        fi
        JM_CONTAINER_ARGS=(--container-image="${CONTAINER_IMAGE}" --container-mounts="${mounts}"
            --container-workdir="${REPO_DIR}")
        if [[ -n "${PYXIS_CONTAINER_NAME:-}" ]]; then
            JM_CONTAINER_ARGS+=(--container-name="${PYXIS_CONTAINER_NAME}")
        fi
    fi
}

# Stop before any rank holds a GPU when the recipe's layout cannot fit NNODES x RANKS_PER_NODE.
# Usage: jm_preflight RECIPE [key=value ...]
jm_preflight() {
    if [[ "${SKIP_PREFLIGHT:-0}" == "1" ]]; then
        jm_log "preflight skipped (SKIP_PREFLIGHT=1)"
        return 0
    fi
    # Overrides go right after the recipe: argparse rejects positionals after the options.
    # In CPU mode --gpus-per-node carries the ranks per node (NTASKS_PER_NODE).
    local cmd=("${PYTHON}" -m joyai_megatron plan "$@" --nodes "${NNODES}" --gpus-per-node "${RANKS_PER_NODE}")
    if [[ -n "${PLAN_ARGS:-}" ]]; then
        local plan_args=()
        read -r -a plan_args <<<"${PLAN_ARGS}"
        cmd+=("${plan_args[@]}")
    fi
    if [[ ${#JM_CONTAINER_ARGS[@]} -gt 0 ]]; then
        # The interpreter lives in the image: run the check as a one-task step inside it.
        cmd=(srun --nodes=1 --ntasks=1 "${JM_CONTAINER_ARGS[@]}" "${cmd[@]}")
    fi
    jm_log "preflight: checking that the layout of $1 fits ${NNODES} x ${RANKS_PER_NODE}"
    if [[ "${PREFLIGHT_ONLY:-0}" == "1" ]]; then
        if [[ ${#JM_CONTAINER_ARGS[@]} -gt 0 ]]; then
            jm_log "preflight not run before submission: CONTAINER_IMAGE is set, so it runs inside the job"
            exit 0
        fi
        printf '+ %s\n' "$(jm_quote "${cmd[@]}")"
        if ! "${cmd[@]}"; then
            jm_die "preflight failed: the layout does not fit ${NNODES} node(s) x ${RANKS_PER_NODE} rank(s) (see above)"
        fi
        jm_log "preflight passed"
        exit 0
    fi
    if ! jm_run "${cmd[@]}"; then
        jm_die "preflight failed: the layout does not fit this allocation (see above); no ranks were started. Set SKIP_PREFLIGHT=1 to bypass."
    fi
    if [[ "${JM_STOP_REQUESTED}" == "1" ]]; then
        _jm_requeue_or_stop
    fi
}

# Run "$@" on every rank (srun, one task per GPU / CPU rank) and apply the stop/requeue policy.
# Returns the step's exit status; exits the script on a signal-driven stop.
jm_launch() {
    if [[ "${JM_STOP_REQUESTED}" == "1" ]]; then
        _jm_requeue_or_stop
    fi
    local extra_srun=()
    if [[ -n "${SRUN_ARGS:-}" ]]; then
        read -r -a extra_srun <<<"${SRUN_ARGS}"
    fi
    local cmd=(srun --nodes="${NNODES}" --ntasks="${WORLD_SIZE}" --ntasks-per-node="${RANKS_PER_NODE}"
        --distribution=block --kill-on-bad-exit=1 --label --export=ALL
        "${JM_CONTAINER_ARGS[@]}" "${extra_srun[@]}"
        bash "${REPO_DIR}/slurm/lib/rank_exec.sh" "$@")
    printf '+ %s\n' "$(jm_quote "${cmd[@]}")"
    if jm_is_dry_run; then
        return 0
    fi
    {
        printf 'restart %s started %s\n' "${JM_RESTART_COUNT}" "$(date -Is)"
        printf 'MASTER_ADDR=%s MASTER_PORT=%s WORLD_SIZE=%s\n' "${MASTER_ADDR}" "${MASTER_PORT}" "${WORLD_SIZE}"
        printf '%s\n' "$(jm_quote "${cmd[@]}")"
    } >>"${JOB_LOG_DIR}/launch.txt"
    # In the background so the USR1/TERM traps run while the ranks work (bash runs traps only
    # between commands; `wait` returns early on a trapped signal, hence the loop).
    "${cmd[@]}" &
    JM_SRUN_PID=$!
    local rc=0
    while true; do
        rc=0
        wait "${JM_SRUN_PID}" || rc=$?
        if ! kill -0 "${JM_SRUN_PID}" 2>/dev/null; then
            break
        fi
    done
    jm_log "srun exited with status ${rc}"
    _jm_log_latest_checkpoint
    printf 'restart %s srun status %s at %s\n' "${JM_RESTART_COUNT}" "${rc}" "$(date -Is)" \
        >>"${JOB_LOG_DIR}/launch.txt"
    if [[ "${JM_STOP_REQUESTED}" == "1" ]]; then
        if [[ "${rc}" -ne 0 ]]; then
            jm_log "ranks exited with status ${rc} after SIGUSR1 instead of 0: not requeueing; the newest complete checkpoint is still usable"
            exit "${rc}"
        fi
        _jm_requeue_or_stop
    fi
    return "${rc}"
}

# The trainer writes <checkpoint.dir>/latest_checkpointed_iteration.txt last, after a complete
# save; report it so the log says where a requeued run will resume (when CHECKPOINT_DIR is known).
_jm_log_latest_checkpoint() {
    local tracker="${CHECKPOINT_DIR:-}/latest_checkpointed_iteration.txt"
    if [[ -n "${CHECKPOINT_DIR:-}" && -f "${tracker}" ]]; then
        jm_log "latest complete checkpoint: iteration $(<"${tracker}") in ${CHECKPOINT_DIR}"
    fi
}

# After a signal-driven clean stop: requeue this job (same id, same environment) so it resumes
# from the newest complete checkpoint, unless MAX_RESTARTS requeues have already happened.
_jm_requeue_or_stop() {
    if [[ "${JM_RESTART_COUNT}" -ge "${MAX_RESTARTS}" ]]; then
        jm_log "restart ${JM_RESTART_COUNT} reached MAX_RESTARTS=${MAX_RESTARTS}: not requeueing; submit again to resume from the checkpoint"
        exit "${JM_EXIT_RESUBMIT}"
    fi
    if [[ -z "${SLURM_JOB_ID:-}" ]]; then
        jm_log "not inside a Slurm job: nothing to requeue"
        exit "${JM_EXIT_RESUBMIT}"
    fi
    jm_log "requeueing job ${SLURM_JOB_ID} (restart $((JM_RESTART_COUNT + 1)) of at most ${MAX_RESTARTS})"
    if ! jm_run scontrol requeue "${SLURM_JOB_ID}"; then
        jm_log "scontrol requeue failed (job submitted with --no-requeue, or JobRequeue=0?): submit again to resume"
        exit "${JM_EXIT_RESUBMIT}"
    fi
    exit 0
}

# Standard training step for a stage: recipe + overrides from the environment, preflight, srun.
# Usage: jm_train STAGE RECIPE [key=value ...]
#   CHECKPOINT_DIR -> checkpoint.dir     LOAD_CHECKPOINT -> checkpoint.load
#   TRAIN_ITERS -> train.train_iters     SAVE_INTERVAL -> checkpoint.save_interval
#   LOG_INTERVAL -> logging.interval     TRAINER_LOG_DIR -> logging.dir [JOB_LOG_DIR]
#   OVERRIDES="a.b=1 c.d=2"              further overrides (no spaces inside a value)
jm_train() {
    local stage="$1" recipe="$2"
    shift 2
    if [[ ! -f "${recipe}" && ! -f "${REPO_DIR}/${recipe}" ]]; then
        jm_die "recipe not found: ${recipe} (relative paths are taken from ${REPO_DIR}); set RECIPE"
    fi
    local overrides=()
    if [[ -n "${CHECKPOINT_DIR:-}" ]]; then overrides+=("checkpoint.dir=${CHECKPOINT_DIR}"); fi
    if [[ -n "${LOAD_CHECKPOINT:-}" ]]; then overrides+=("checkpoint.load=${LOAD_CHECKPOINT}"); fi
    if [[ -n "${TRAIN_ITERS:-}" ]]; then overrides+=("train.train_iters=${TRAIN_ITERS}"); fi
    if [[ -n "${SAVE_INTERVAL:-}" ]]; then overrides+=("checkpoint.save_interval=${SAVE_INTERVAL}"); fi
    if [[ -n "${LOG_INTERVAL:-}" ]]; then overrides+=("logging.interval=${LOG_INTERVAL}"); fi
    overrides+=("logging.dir=${TRAINER_LOG_DIR:-${JOB_LOG_DIR}}")
    if [[ -n "${OVERRIDES:-}" ]]; then
        local extra=()
        read -r -a extra <<<"${OVERRIDES}"
        overrides+=("${extra[@]}")
    fi
    overrides+=("$@")
    jm_log "stage ${stage}, recipe ${recipe}"
    jm_preflight "${recipe}" "${overrides[@]}"
    jm_launch "${PYTHON}" -m joyai_megatron "${stage}" "${recipe}" "${overrides[@]}"
}
