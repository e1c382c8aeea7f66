#!/usr/bin/env bash
# Cloud TPU VM or pod slice: create it, copy the code to every worker, install, run the same
# training command on every worker, fetch the per-worker logs, delete it.
#   T="--name=vlbpe --zone=us-east5-a --type=v5p-32"      # 4 workers (hosts)
#   bash launch/tpu.sh create $T [--spot] [--queued]        # --queued: a queued resource
#   bash launch/tpu.sh setup  $T                            # copy HEAD, pip install -e ".[tpu]"
#   bash launch/tpu.sh train  $T --config=configs/tiny.py --workdir=/mnt/runs/r1 \
#       --config.lm.total_steps=1000                        # --config.* go to the program
#   bash launch/tpu.sh logs   $T                            # -> logs/tpu/vlbpe/worker-<i>.log
#   bash launch/tpu.sh delete $T [--queued]
#   bash launch/tpu.sh all    $T --config=... --workdir=... # create, setup, train
# --dry-run prints the commands, one shell line each, and runs nothing. Resume: rerun the same
# train command; the pipeline continues from what --workdir holds (shared by every worker).
# Every worker runs `VLBPE_DISTRIBUTED=1 python -m vlbpe_jax.main ...`: jax.distributed finds
# the other workers from the TPU metadata. Its output goes to the terminal and, per worker, to
# <remote-dir>/logs/train.log (--detach: only there; `stop` ends it).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat >&2 <<'EOF'
usage: bash launch/tpu.sh {create|setup|train|logs|stop|delete|all} [options] [-- program args]
  --name=NAME        TPU (and queued resource) name [vlbpe]
  --zone=ZONE        zone, e.g. us-east5-a (required)
  --project=PROJECT  project [gcloud's default]
  --type=TYPE        accelerator type: v4-32, v5p-8, v5litepod-16, v6e-8, ... [v5p-8]
  --version=VERSION  runtime (software) version [the one Cloud TPU docs give for TYPE]
  --workers=N        hosts in the slice [from TYPE]
  --spot             spot capacity
  --queued           create/delete a queued resource (waits until it is ACTIVE)
  --config=PATH      config file, relative to the repository root (train, all)
  --workdir=DIR      the run's directory, the same shared path on every worker (train, all)
  --config.F=V       config overrides, passed to the program unchanged (also after --)
  --detach           train in the background (nohup); `stop` ends it
  --remote-dir=DIR   code directory on each worker, under its home [vlbpe_jax]
  --python=PY        Python >= 3.11 on the workers [python3.11]
  --logdir=DIR       where `logs` puts worker-<i>.log [logs/tpu/NAME]
  --dry-run          print the commands, run nothing
EOF
}

die() {  # a bad argument: one line naming it
  echo "error: $*" >&2
  echo "usage: bash launch/tpu.sh {create|setup|train|logs|stop|delete|all} [options];" \
    "--help lists them" >&2
  exit 2
}

# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # q (quote a command line), run (or print it)

NAME=vlbpe ZONE="" PROJECT="" TYPE=v5p-8 VERSION="" WORKERS="" SPOT=0 QUEUED=0
CONFIG="" WORKDIR="" DETACH=0 REMOTE_DIR=vlbpe_jax PY=python3.11 LOGDIR="" DRY_RUN=0 CMD=""
PASS=()  # arguments for the program
while (($#)); do
  case "$1" in
    --name=*) NAME=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --project=*) PROJECT=${1#*=} ;;
    --type=*) TYPE=${1#*=} ;;
    --version=*) VERSION=${1#*=} ;;
    --workers=*) WORKERS=${1#*=} ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --config=*) CONFIG=${1#*=} ;;
    --workdir=*) WORKDIR=${1#*=} ;;
    --detach) DETACH=1 ;;
    --remote-dir=*) REMOTE_DIR=${1#*=} ;;
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
  create | setup | train | logs | stop | delete | all) ;;
  "") die "missing subcommand" ;;
  *) die "unknown subcommand '$CMD'" ;;
esac

[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name='$NAME': expected lower-case letters, digits and '-', starting with a letter"
[ -n "$ZONE" ] || die "--zone is required (e.g. --zone=us-east5-a)"
# Hosts and runtime per accelerator type (cloud.google.com/tpu/docs/runtimes): v2-v5p count
# TensorCores (8 per host); v5litepod (v5e) and v6e count chips (up to 8 on one host, else 4).
[[ $TYPE =~ ^(v2|v3|v4|v5p|v5litepod|v6e)-([1-9][0-9]*)$ ]] ||
  die "--type='$TYPE': unknown accelerator type; expected e.g. v4-32, v5p-8, v5litepod-16, v6e-8"
FAMILY=${BASH_REMATCH[1]} SIZE=${BASH_REMATCH[2]}
case "$FAMILY" in
  v2 | v3 | v4) DEFAULT_VERSION=tpu-ubuntu2204-base HOSTS=$(((SIZE + 7) / 8)) ;;
  v5p) DEFAULT_VERSION=v2-alpha-tpuv5 HOSTS=$(((SIZE + 7) / 8)) ;;
  v5litepod) DEFAULT_VERSION=v2-alpha-tpuv5-lite HOSTS=$((SIZE <= 8 ? 1 : SIZE / 4)) ;;
  v6e) DEFAULT_VERSION=v2-alpha-tpuv6e HOSTS=$((SIZE <= 8 ? 1 : SIZE / 4)) ;;
esac
VERSION=${VERSION:-$DEFAULT_VERSION}
WORKERS=${WORKERS:-$HOSTS}
[[ $WORKERS =~ ^[1-9][0-9]*$ ]] || die "--workers='$WORKERS': expected a positive integer"
LOGDIR=${LOGDIR:-logs/tpu/$NAME}
if [ "$CMD" = train ] || [ "$CMD" = all ]; then
  [ -n "$CONFIG" ] || die "--config is required for $CMD"
  [ -f "${CONFIG%%:*}" ] || die "--config='$CONFIG': no such file (relative to the repository root)"
  [ -n "$WORKDIR" ] || die "--workdir is required for $CMD"
  # The package writes its artifacts with plain file I/O: a bucket must be mounted (gcsfuse).
  [[ $WORKDIR != *://* ]] || die "--workdir='$WORKDIR': the package writes plain files; mount" \
    "the bucket (gcsfuse) or a Filestore share at the same path on every worker and pass it"
  ((WORKERS == 1)) || [[ $WORKDIR == /* ]] || die "--workdir='$WORKDIR': $WORKERS workers" \
    "need one shared directory: an absolute path mounted on every worker"
fi
if ((!DRY_RUN)) && ! command -v gcloud >/dev/null; then
  echo "error: gcloud not found; install the Google Cloud CLI (cloud.google.com/sdk)" >&2
  exit 2
fi

GC=(--zone="$ZONE")  # flags of every gcloud command
[ -z "$PROJECT" ] || GC+=(--project="$PROJECT")
SPOT_FLAG=()
((!SPOT)) || SPOT_FLAG=(--spot)
TARBALL=${TMPDIR:-/tmp}/vlbpe_jax-$NAME.tar.gz

on_all() {  # one shell command line on every worker at once
  run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all --command="$1" "${GC[@]}"
}

create() {
  if ((!QUEUED)); then
    run gcloud compute tpus tpu-vm create "$NAME" --accelerator-type="$TYPE" \
      --version="$VERSION" "${SPOT_FLAG[@]}" "${GC[@]}"
    return
  fi
  run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" \
    --accelerator-type="$TYPE" --runtime-version="$VERSION" "${SPOT_FLAG[@]}" "${GC[@]}"
  local state=""
  local describe=(gcloud compute tpus queued-resources describe "$NAME"
    --format='value(state.state)' "${GC[@]}")
  if ((DRY_RUN)); then
    echo "# until the state is ACTIVE, every 60 s:"
    q "${describe[@]}"
    return
  fi
  while :; do
    state=$("${describe[@]}")
    [ "$state" != ACTIVE ] || break
    if [ "$state" = FAILED ] || [ "$state" = SUSPENDED ]; then
      echo "error: queued resource $NAME is $state" >&2
      exit 1
    fi
    echo "queued resource $NAME: $state; next check in 60 s" >&2
    sleep 60
  done
}

setup() {  # the committed tree (HEAD) to every worker, then a venv with .[tpu] on each
  if ((!DRY_RUN)) && [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    echo "note: uncommitted changes are not copied (setup copies HEAD)" >&2
  fi
  run git archive --format=tar.gz --output="$TARBALL" HEAD
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:vlbpe_jax-src.tar.gz" --worker=all \
    "${GC[@]}"
  local d py c
  d=$(q "$REMOTE_DIR") py=$(q "$PY")
  c="set -e; command -v $py >/dev/null || { sudo apt-get update -q &&"
  c+=" sudo apt-get install -y -q $py $py-venv; }; mkdir -p $d; tar -xzf vlbpe_jax-src.tar.gz"
  c+=" -C $d; cd $d; [ -x .venv/bin/python ] || $py -m venv .venv;"
  c+=" .venv/bin/pip install -q --upgrade pip; .venv/bin/pip install -q -e '.[tpu]'"
  on_all "$c"
}

train() {  # the same command on every worker; VLBPE_DISTRIBUTED=1: jax.distributed joins them
  local d program
  d=$(q "$REMOTE_DIR")
  program=$(q .venv/bin/python -m vlbpe_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
    "${PASS[@]}")
  if ((DETACH)); then
    on_all "cd $d && mkdir -p logs && { VLBPE_DISTRIBUTED=1 nohup $program >>logs/train.log\
 2>&1 </dev/null & echo \$! >logs/train.pid; }"
  else
    on_all "set -o pipefail; cd $d && mkdir -p logs && VLBPE_DISTRIBUTED=1 $program 2>&1\
 | tee -a logs/train.log"
  fi
}

logs() {  # each worker's logs/train.log -> $LOGDIR/worker-<i>.log
  run mkdir -p "$LOGDIR"
  local i
  for ((i = 0; i < WORKERS; i++)); do
    run gcloud compute tpus tpu-vm scp "$NAME:$REMOTE_DIR/logs/train.log" \
      "$LOGDIR/worker-$i.log" --worker="$i" "${GC[@]}"
  done
}

stop() {  # ends a --detach run on every worker
  on_all "cd $(q "$REMOTE_DIR") && if [ -f logs/train.pid ]; then kill \"\$(cat logs/train.pid)\"\
 2>/dev/null || true; rm -f logs/train.pid; fi"
}

delete() {
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources delete "$NAME" --force --quiet "${GC[@]}"
  else
    run gcloud compute tpus tpu-vm delete "$NAME" --quiet "${GC[@]}"
  fi
}

case "$CMD" in
  all) create; setup; train ;;
  *) "$CMD" ;;
esac
