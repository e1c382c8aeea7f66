#!/usr/bin/env bash
# NVIDIA GPUs: one node (one process driving all its GPUs) or several nodes under SLURM.
#   bash launch/gpu.sh setup                      # .venv with pip install -e ".[gpu]"
#   bash launch/gpu.sh train --config=configs/tiny.py --workdir=runs/gpu \
#       --config.lm.total_steps=1000              # one node; --config.* go to the program
#   bash launch/gpu.sh slurm --nodes=2 --gpus-per-node=8 --config=configs/tiny.py \
#       --workdir=/shared/runs/r1 [--per=gpu] [--partition=P] [--account=A] [--time=T]
# `slurm` writes <logdir>/<job-name>.sbatch and submits it with sbatch (run it on a login node,
# from this repository on a filesystem every node mounts, after `setup`). In the job, the first
# host of the allocation (`scontrol show hostnames`) is the coordinator and `srun` starts one
# process per node (--per=node: each drives all its node's GPUs) or per GPU (--per=gpu); each
# gets VLBPE_DISTRIBUTED=1, VLBPE_PROCESS_ID=$SLURM_PROCID, VLBPE_NUM_PROCESSES=$SLURM_NTASKS,
# JAX_COORDINATOR_ADDRESS and JAX_LOCAL_DEVICE_IDS, so jax.distributed.initialize needs no
# detection. Logs: <logdir>/train.log (train), <logdir>/<job>-<jobid>-<task>.log (slurm).
# --dry-run prints the commands, one shell line each (the script as a here-document), and runs
# nothing. Resume: rerun the same command; the pipeline continues from what --workdir holds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

usage() {
  cat >&2 <<'EOF'
usage: bash launch/gpu.sh {setup|train|slurm} [options] [-- program args]
  --config=PATH        config file, relative to the repository root (train, slurm)
  --workdir=DIR        the run's directory; under slurm one path every node mounts
  --config.F=V         config overrides, passed to the program unchanged (also after --)
  --gpus=LIST          train: CUDA_VISIBLE_DEVICES, e.g. 0,1,2,3 [all]
  --nodes=N            slurm: nodes [1]
  --gpus-per-node=G    slurm: GPUs per node [8]
  --per=node|gpu       slurm: one process per node (all its GPUs) or per GPU [node]
  --partition=P --account=A --time=T --job-name=J [vlbpe]   slurm: sbatch options
  --sbatch=OPT         slurm: one more #SBATCH line, e.g. --sbatch=--exclusive (repeatable)
  --port=PORT          slurm: coordinator port [61440 + job id mod 4096, as JAX derives it]
  --python=PY          setup: Python >= 3.11 [python3.11]
  --logdir=DIR         logs and the sbatch script [logs/gpu]
  --dry-run            print the commands, run nothing
EOF
}

die() {  # a bad argument: one line naming it
  echo "error: $*" >&2
  echo "usage: bash launch/gpu.sh {setup|train|slurm} [options]; --help lists them" >&2
  exit 2
}

# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # q (quote a command line), run (or print it)

CONFIG="" WORKDIR="" GPUS="" NODES=1 GPUS_PER_NODE=8 PER=node PARTITION="" ACCOUNT=""
TIME="" JOB=vlbpe PORT="" PY=python3.11 LOGDIR=logs/gpu DRY_RUN=0 CMD=""
SBATCH_EXTRA=() PASS=()  # PASS: arguments for the program
while (($#)); do
  case "$1" in
    --config=*) CONFIG=${1#*=} ;;
    --workdir=*) WORKDIR=${1#*=} ;;
    --gpus=*) GPUS=${1#*=} ;;
    --nodes=*) NODES=${1#*=} ;;
    --gpus-per-node=*) GPUS_PER_NODE=${1#*=} ;;
    --per=*) PER=${1#*=} ;;
    --partition=*) PARTITION=${1#*=} ;;
    --account=*) ACCOUNT=${1#*=} ;;
    --time=*) TIME=${1#*=} ;;
    --job-name=*) JOB=${1#*=} ;;
    --sbatch=*) SBATCH_EXTRA+=("${1#*=}") ;;
    --port=*) PORT=${1#*=} ;;
    --python=*) PY=${1#*=} ;;
    --logdir=*) LOGDIR=${1#*=} ;;
    --dry-run) DRY_RUN=1 ;;
    --config.*) PASS+=("$1") ;;
    --) shift; PASS+=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    -*) die "unknown argument '$1' (program arguments go after --)" ;;
    *) [ -z "$CMD" ] || die "unknown argument '$1' (program arguments go after --)"; CMD=$1 ;;
  esac
  shift
done
case "$CMD" in
  setup | train | slurm) ;;
  "") die "missing subcommand" ;;
  *) die "unknown subcommand '$CMD'" ;;
esac

if [ "$CMD" != setup ]; then
  [ -n "$CONFIG" ] || die "--config is required for $CMD"
  [ -f "${CONFIG%%:*}" ] || die "--config='$CONFIG': no such file (relative to the repository root)"
  [ -n "$WORKDIR" ] || die "--workdir is required for $CMD"
  [[ $WORKDIR != *://* ]] || die "--workdir='$WORKDIR': the package writes plain files;" \
    "expected a local or shared (NFS, Lustre, gcsfuse) path"
fi
[ -z "$GPUS" ] || [[ $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] ||
  die "--gpus='$GPUS': expected GPU indices like 0,1,2,3"
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes='$NODES': expected a positive integer"
[[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] ||
  die "--gpus-per-node='$GPUS_PER_NODE': expected a positive integer"
[[ $PER == node || $PER == gpu ]] || die "--per='$PER': expected node or gpu"
if [ -n "$PORT" ] && ! { [[ $PORT =~ ^[1-9][0-9]*$ ]] && ((PORT <= 65535)); }; then
  die "--port='$PORT': expected a port number (1-65535)"
fi
[[ $JOB =~ ^[A-Za-z0-9_.-]+$ ]] || die "--job-name='$JOB': expected letters, digits, '_.-'"
if [ "$CMD" = slurm ]; then
  [[ $WORKDIR == /* ]] ||
    die "--workdir='$WORKDIR': under slurm, an absolute path every node mounts"
  if ((!DRY_RUN)) && ! command -v sbatch >/dev/null; then
    echo "error: sbatch not found; run this on a SLURM login node" >&2
    exit 2
  fi
fi
[[ $LOGDIR == /* ]] || LOGDIR=$ROOT/$LOGDIR
[[ $LOGDIR != *[[:space:]]* ]] || die "--logdir='$LOGDIR': no spaces (it goes on #SBATCH lines)"
PROGRAM=(.venv/bin/python -m vlbpe_jax.main --config="$CONFIG" --workdir="$WORKDIR" "${PASS[@]}")

setup() {  # .venv beside the code, with the CUDA 12 plugin of the pinned jax
  [ -x .venv/bin/python ] || run "$PY" -m venv .venv
  run .venv/bin/pip install -q --upgrade pip
  run .venv/bin/pip install -q -e ".[gpu]"
}

train() {  # one process sees every local GPU (or --gpus); output also in $LOGDIR/train.log
  run mkdir -p "$LOGDIR"
  local env=()
  [ -z "$GPUS" ] || env=(env CUDA_VISIBLE_DEVICES="$GPUS")
  if ((DRY_RUN)); then
    echo "$(q "${env[@]}" "${PROGRAM[@]}") 2>&1 | tee -a $(q "$LOGDIR/train.log")"
  else
    "${env[@]}" "${PROGRAM[@]}" 2>&1 | tee -a "$LOGDIR/train.log"
  fi
}

# shellcheck disable=SC2016  # '$SLURM_...' is text of the script, expanded in the job
sbatch_script() {  # the job: coordinator = first host; srun starts the processes
  local tasks=1 ids port
  ids=$(seq -s, 0 $((GPUS_PER_NODE - 1)))  # per node: every local GPU
  if [ "$PER" = gpu ]; then tasks=$GPUS_PER_NODE ids='$SLURM_LOCALID'; fi
  port=${PORT:-'$((SLURM_JOB_ID % 4096 + 61440))'}
  echo "#!/bin/bash"
  echo "#SBATCH --job-name=$JOB"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=$tasks"
  echo "#SBATCH --gpus-per-node=$GPUS_PER_NODE"
  echo "#SBATCH --output=$LOGDIR/$JOB-%j.out"
  [ -z "$PARTITION" ] || echo "#SBATCH --partition=$PARTITION"
  [ -z "$ACCOUNT" ] || echo "#SBATCH --account=$ACCOUNT"
  [ -z "$TIME" ] || echo "#SBATCH --time=$TIME"
  local opt
  for opt in "${SBATCH_EXTRA[@]}"; do echo "#SBATCH $opt"; done
  echo "set -euo pipefail"
  echo "cd $(q "$ROOT")"
  echo 'hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")'
  # Not `| head -n 1`: head exits early, scontrol may die of SIGPIPE, and pipefail ends the job.
  printf '%s\n' "head_host=\${hosts%%\$'\\n'*}  # the first host"
  echo "export VLBPE_DISTRIBUTED=1"
  echo "export JAX_COORDINATOR_ADDRESS=\"\$head_host:$port\""
  local task_env='export VLBPE_PROCESS_ID=$SLURM_PROCID VLBPE_NUM_PROCESSES=$SLURM_NTASKS'
  if [ "$PER" = node ]; then
    echo "export JAX_LOCAL_DEVICE_IDS=$ids"
  else
    task_env+=" JAX_LOCAL_DEVICE_IDS=$ids"
  fi
  echo "# shellcheck disable=SC2016  # each task expands its own \$SLURM_* in bash -c"
  q srun --kill-on-bad-exit=1 --output="$LOGDIR/$JOB-%j-%t.log" \
    bash -c "$task_env; exec \"\$@\"" bash "${PROGRAM[@]}"
}

slurm() {
  local script=$LOGDIR/$JOB.sbatch
  run mkdir -p "$LOGDIR"
  if ((DRY_RUN)); then
    echo "cat >$(q "$script") <<'SBATCH_EOF'"
    sbatch_script
    echo "SBATCH_EOF"
  else
    sbatch_script >"$script"
    echo "wrote $script" >&2
  fi
  run sbatch "$script"
}

"$CMD"
