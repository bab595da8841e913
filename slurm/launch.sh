#!/usr/bin/env bash
# The one Slurm launcher. Each slurm/<recipe>.sh holds the #SBATCH lines, sets RECIPE and runs
# this file (docs/slurm.md). It starts one task per node, each running the trainer under
# `accelerate launch`; when Slurm signals the coming time limit (USR1 to this shell) it asks the
# trainer to checkpoint, then requeues the job, which resumes into the same MLflow run.
#
# Settings, from the environment [default]:
#   RECIPE               recipe YAML, relative to PIPELINE_ROOT     [set by the per-recipe script]
#   PIPELINE_ROOT        the repository checkout                    [$SLURM_SUBMIT_DIR]
#   RUN_NAME             name of the run's folder   [the recipe's path under recipes/, '/' as '_':
#                                                    recipes/imagenet/cutmix.yaml → imagenet_cutmix]
#   OUTPUT_ROOT          where run folders go                       [$PIPELINE_ROOT/runs]
#   OUTPUT_DIR           this run: checkpoints, PREEMPT file        [$OUTPUT_ROOT/$RUN_NAME]
#                        (the same folder on requeue, and on a later sbatch of the same script:
#                        a run continues where it stopped until its recipe is done)
#   DATA_ROOT            dataset root, passed as data.root          [the recipe's]
#   PRETRAINED           weights to start from, model.pretrained    [the recipe's]
#   MLFLOW_TRACKING_URI  MLflow store     [sqlite:///$PIPELINE_ROOT/mlflow.db: the checkout's, which
#                                         `make demo`, `make compare` and `make mlflow-ui` use]
#   EXTRA_OVERRIDES      more key=value recipe overrides, space-separated, applied last   []
#   GPUS_PER_NODE        [Slurm's $SLURM_GPUS_ON_NODE, else $SLURM_GPUS_PER_NODE, else 0 (CPU)]
#   MAIN_ADDR            rendezvous address                         [NodeAddr of the first node]
#   MAIN_PORT            rendezvous port                            [20000 + job id % 20000]
#   MAX_LOST_REQUEUES    requeues in a row after a rank stopped answering, with no new
#                        checkpoint in between                      [3]
#   PYTHON               interpreter     [$PIPELINE_ROOT/.venv/bin/python if present, else python3;
#                                         python inside a container]
#   CONTAINER_IMAGE      run in this image through Pyxis/enroot     [unset: no container]
#   CONTAINER_MOUNTS     Pyxis --container-mounts    [PIPELINE_ROOT, OUTPUT_ROOT, DATA_ROOT, each
#                                                     at the same path]
# Partition, account, time, nodes, GPUs and CPUs are sbatch's: flags (`sbatch -p gpu -A proj
# -N 4 --gpus-per-node=8 slurm/x.sh`) or its variables (SBATCH_PARTITION, SBATCH_ACCOUNT,
# SBATCH_TIMELIMIT). Exit status: 0 finished (or requeued), 2 bad settings or recipe (or another
# job trains in the same OUTPUT_DIR), 3 checkpointed but not requeued (submit again to continue),
# 4 a checkpoint or model file could not be written (disk full, quota, permission: needs
# attention; one process only, since torchrun reports a worker's 4 as 1), 5 a rank stopped
# answering and the requeues allowed in a row are spent, else the trainer's.
#
# `bash slurm/launch.sh --print-command` (or `bash slurm/<recipe>.sh --print-command`) prints the
# srun command built from the SLURM_* variables and the settings above, and runs nothing.
set -euo pipefail

die() {
    echo "launch.sh: error: $*" >&2
    exit 2
}

# Fill in every setting from the environment and Slurm's variables.
resolve_settings() {
    ROOT=${PIPELINE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
    [[ -n ${RECIPE:-} ]] || die "RECIPE is not set (the scripts in slurm/ set it)"
    cd "$ROOT" || die "PIPELINE_ROOT '$ROOT' is not a folder"
    [[ -f $RECIPE ]] || die "recipe '$RECIPE' not found under $ROOT"
    if [[ -z ${RUN_NAME:-} ]]; then
        RUN_NAME=${RECIPE#recipes/}
        RUN_NAME=${RUN_NAME%.yaml}
        RUN_NAME=${RUN_NAME//\//_}
    fi
    OUTPUT_ROOT=${OUTPUT_ROOT:-$ROOT/runs}
    OUTPUT_DIR=${OUTPUT_DIR:-$OUTPUT_ROOT/$RUN_NAME}
    export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$ROOT/mlflow.db}
    NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    local gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}}
    GPUS=${gpus##*:} # a typed request such as "a100:8" counts 8
    [[ $GPUS =~ ^[0-9]+$ ]] || die "cannot read a GPU count from '$gpus'"
    NPROC=$((NNODES * (GPUS > 0 ? GPUS : 1)))
    MAIN_PORT=${MAIN_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
    if [[ -n ${CONTAINER_IMAGE:-} ]]; then
        PYTHON=${PYTHON:-python}
    elif [[ -z ${PYTHON:-} && -x $ROOT/.venv/bin/python ]]; then
        PYTHON=$ROOT/.venv/bin/python
    fi
    PYTHON=${PYTHON:-python3}
    if ((NPROC > 1)) && [[ -z ${MAIN_ADDR:-} ]]; then resolve_main_address; fi
}

# A SQLite MLflow store on a network filesystem breaks as soon as two jobs write to it.
warn_if_shared_sqlite() {
    [[ $MLFLOW_TRACKING_URI == sqlite:///* ]] || return 0
    local dir
    dir=$(dirname "${MLFLOW_TRACKING_URI#sqlite:///}")
    while [[ ! -d $dir && $dir != / && $dir != . ]]; do dir=$(dirname "$dir"); done
    case $(stat -f -c %T "$dir" 2>/dev/null) in
    nfs* | lustre | gpfs | *beegfs* | cifs | smb* | fuse.*)
        echo "launch.sh: warning: MLflow store $MLFLOW_TRACKING_URI is SQLite on a network" \
            "filesystem; with several jobs use an MLflow server (docs/slurm.md)" >&2
        ;;
    esac
}

# MAIN_ADDR: where process 0 listens, the first node's NodeAddr in Slurm, which is its host name
# on most clusters (`scontrol show hostnames` gives node names, which need not resolve).
resolve_main_address() {
    [[ -n ${SLURM_JOB_NODELIST:-} ]] || die "SLURM_JOB_NODELIST is not set (not inside a job?)"
    local first
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1) || true
    [[ -n $first ]] || die "scontrol cannot expand SLURM_JOB_NODELIST '$SLURM_JOB_NODELIST'"
    MAIN_ADDR=$(scontrol show node "$first" 2>/dev/null |
        sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p') || true
    MAIN_ADDR=${MAIN_ADDR:-$first}
}

# Set CMD to the srun command: one task per node, each running the trainer.
build_command() {
    local trainer=(-m pipeline train --recipe "$RECIPE"
        "train.output_dir=$OUTPUT_DIR" train.resume=auto)
    if [[ -n ${DATA_ROOT:-} ]]; then trainer+=("data.root=$DATA_ROOT"); fi
    if [[ -n ${PRETRAINED:-} ]]; then trainer+=("model.pretrained=$PRETRAINED"); fi
    if ((GPUS == 0)); then trainer+=(train.cpu=true); fi
    local extra=()
    read -r -a extra <<<"${EXTRA_OVERRIDES:-}"
    trainer+=("${extra[@]}")

    # The per-node shell ignores USR1 before exec, so the launchers inherit "ignore" and live
    # through a forwarded USR1, while the trainer installs its own handler (preempt.py).
    local node="trap '' USR1; exec"
    if ((NPROC == 1)); then
        # One process needs no launcher, and its exit status (3: checkpointed) comes through.
        node+=$(printf ' %q' "$PYTHON" "${trainer[@]}")
    else
        # --multi_gpu selects torchrun; with train.cpu=true the same processes use gloo on CPUs.
        node+=$(printf ' %q' "$PYTHON" -m accelerate.commands.launch --multi_gpu \
            --num_machines "$NNODES" --num_processes "$NPROC" \
            --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT")
        # shellcheck disable=SC2016  # expanded by the shell on each node, not here
        node+=' --machine_rank "$SLURM_NODEID"'
        node+=$(printf ' %q' "${trainer[@]}")
    fi

    CMD=(srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1)
    # Since Slurm 22.05 a step no longer inherits the job's --cpus-per-task.
    if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then CMD+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
    if [[ -n ${CONTAINER_IMAGE:-} ]]; then
        CMD+=(--container-image="$CONTAINER_IMAGE"
            --container-mounts="${CONTAINER_MOUNTS:-$(default_mounts)}"
            --container-workdir="$ROOT")
    fi
    CMD+=(bash -c "$node")
}

# Pyxis mounts for the checkout and the run, data and weights folders outside it, each at its own
# path, so that every path the trainer is given means the same inside the container.
default_mounts() {
    local mounts=("$ROOT") dir m covered
    for dir in "$OUTPUT_ROOT" "${DATA_ROOT:-}" "$(dirname "${PRETRAINED:-.}")"; do
        [[ $dir == /* ]] || continue
        covered=0
        for m in "${mounts[@]}"; do
            if [[ $dir == "$m" || $dir == "$m"/* ]]; then covered=1; fi
        done
        if ((!covered)); then mounts+=("$dir"); fi
    done
    local out=""
    for m in "${mounts[@]}"; do out+=",$m:$m"; done
    echo "${out#,}"
}

# The newest complete checkpoint's state file (folders step_XXXXXXXX sort by step), or "".
latest_checkpoint() {
    local found="" f
    for f in "$OUTPUT_DIR"/checkpoints/step_*/trainer_state.json; do
        if [[ -e $f ]]; then found=$f; fi
    done
    echo "$found"
}

STOP_REQUESTED=0
JOB_ENDING=0

# Slurm's warning before the time limit (USR1) or the end of the job (TERM): ask the trainer to
# checkpoint at its next check, through the stop file (every rank polls it) and through USR1,
# which srun passes on to every process of its step (the trainers handle it, the launchers
# ignore it: see build_command).
# shellcheck disable=SC2317  # called from the traps
on_stop() {
    STOP_REQUESTED=1
    if [[ $1 == TERM ]]; then JOB_ENDING=1; fi
    echo "launch.sh: got SIG$1: asking the trainer to checkpoint and stop"
    touch "$OUTPUT_DIR/PREEMPT"
    if [[ -n ${SRUN_PID:-} ]]; then kill -USR1 "$SRUN_PID" 2>/dev/null || true; fi
}

requeue() {
    trap - USR1 TERM
    echo "launch.sh: checkpoint saved in $OUTPUT_DIR; requeueing job $SLURM_JOB_ID"
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
    echo "launch.sh: scontrol requeue failed: submit the same script again to continue" >&2
    exit 3
}

# A rank hung or was lost (the trainer's exit 5, or its RANK_LOST file when torchrun reports 1):
# requeue, up to MAX_LOST_REQUEUES times in a row without a new checkpoint.
# shellcheck disable=SC2317  # called from finish
rank_lost() {
    local rc=$1 counter=$OUTPUT_DIR/.lost_requeues count
    cat "$OUTPUT_DIR/RANK_LOST" 2>/dev/null || true
    rm -f "$OUTPUT_DIR/RANK_LOST"
    if [[ $(latest_checkpoint) != "$START_CHECKPOINT" ]]; then rm -f "$counter"; fi
    count=$(cat "$counter" 2>/dev/null || echo 0)
    if ((count >= ${MAX_LOST_REQUEUES:-3})); then
        echo "launch.sh: a rank stopped answering (exit $rc), $count time(s) in a row without" \
            "a new checkpoint; not requeued: check the nodes, then submit again" >&2
        exit 5
    fi
    echo $((count + 1)) >"$counter"
    echo "launch.sh: a rank stopped answering (exit $rc); requeueing to resume from the last" \
        "checkpoint"
    requeue
}

# Decide from the trainer's exit status what the job does next.
finish() {
    local rc=$1
    if ((rc == 0)); then
        echo "launch.sh: run finished"
        exit 0
    fi
    if ((rc == 2)); then
        echo "launch.sh: the recipe or its overrides were rejected (error above); not requeued" >&2
        exit 2
    fi
    if ((rc == 4)); then
        echo "launch.sh: a checkpoint or model file could not be written (error above: space," \
            "quota or permission); needs attention, not requeued: fix it and submit again" >&2
        exit 4
    fi
    if ((JOB_ENDING)); then
        echo "launch.sh: Slurm is ending the job (exit $rc); not requeued from here" >&2
        exit "$rc"
    fi
    if ((rc == 5)) || [[ -e $OUTPUT_DIR/RANK_LOST ]]; then rank_lost "$rc"; fi
    # `accelerate launch` (torchrun) reports a worker's exit status 3 as 1, so a checkpoint newer
    # than the one this job started from also counts as "stopped on request".
    if ((rc == 3)); then requeue; fi
    if ((STOP_REQUESTED)) && [[ $(latest_checkpoint) != "$START_CHECKPOINT" ]]; then requeue; fi
    echo "launch.sh: training failed (exit $rc); not requeued" >&2
    exit "$rc"
}

main() {
    local print_only=0
    case ${1:-} in
    --print-command) print_only=1 ;;
    "") ;;
    *) die "unknown argument '$1' (only --print-command)" ;;
    esac
    resolve_settings
    warn_if_shared_sqlite
    build_command
    if ((print_only)); then
        printf '%q ' "${CMD[@]}"
        echo
        exit 0
    fi
    [[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a Slurm job: submit it with sbatch"

    mkdir -p "$OUTPUT_DIR"
    rm -f "$OUTPUT_DIR/PREEMPT" "$OUTPUT_DIR/RANK_LOST" # stale: a run that died before reading it
    trap 'on_stop USR1' USR1
    trap 'on_stop TERM' TERM
    START_CHECKPOINT=$(latest_checkpoint)
    echo "launch.sh: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $NNODES node(s)" \
        "x $GPUS GPU(s), $NPROC process(es); output $OUTPUT_DIR;" \
        "resuming from ${START_CHECKPOINT:-nothing}; MLflow store $MLFLOW_TRACKING_URI"
    echo "launch.sh: $(printf '%q ' "${CMD[@]}")"
    "${CMD[@]}" &
    SRUN_PID=$!
    local rc
    while :; do
        rc=0
        wait "$SRUN_PID" || rc=$?
        # A trapped signal interrupts `wait` (status > 128) while srun still runs: wait again.
        if ((rc > 128)) && kill -0 "$SRUN_PID" 2>/dev/null; then
            continue
        fi
        break
    done
    finish "$rc"
}

main "$@"
