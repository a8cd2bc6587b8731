#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: create it, install, run on every worker, delete it.
#
# Usage: launch/tpu_pod.sh create|install|run|stop|delete|all [-- ARGS...]
#   e.g. NAME=hn-pod TYPE=v4-32 BUCKET=gs://my-bucket DATASETS=hn_sop \
#        launch/tpu_pod.sh all -- --config=configs/sop.py
# ARGS reach hn_jax.main on every worker as typed, after --distributed=yes --workdir=$WORKDIR.
#   create   a slice (refused if NAME exists)        install  code, Python, venv (and gcsfuse)
#   run      stage the data, train on every worker   stop     SIGTERM the run: it checkpoints
#   delete   the slice and its disks                 all      create, install, run, delete;
#            the slice is deleted however `all` ends (failure, Ctrl-C) unless create failed
#            before any slice existed.
# Settings, from the environment:
#   BUCKET         gs://bucket[/prefix] with data/ (prepared datasets) and runs/ (required)
#   NAME ZONE TYPE VERSION  the slice (hn-jax, us-central2-b, v4-32, tpu-ubuntu2204-base)
#   SPOT           non-empty: a spot slice (cheaper; may be preempted)
#   SERVICE_ACCOUNT  the workers' identity (default: the project's Compute Engine default one);
#                  it needs to read $BUCKET/data and write the workdir
#   WORKDIR        the run's workdir (default $BUCKET/runs/$NAME; Orbax and TensorBoard write gs://)
#   DATASETS       folders of $BUCKET/data to read, e.g. "hn_sop" (default all; none: digits)
#   DATA_MODE      copy (default): `run` syncs them to each worker's disk, ~/hn_data;
#                  mount: gcsfuse mounts $BUCKET/data read-only at ~/hn_data (no disk needed)
#   REPO_URL       git URL the workers clone; empty: ship this checkout's files (not ignored ones)
#   WORKER_PYTHON  the workers' Python (default python3.11, installed by `install` with apt)
#   PREFLIGHT      0: skip the check that `create` and `all` run first, here, with this
#                  checkout's Python: `python -m hn_jax.preflight --topology=$TYPE` compiles
#                  the run's --config for the slice (no TPU needed; a few minutes for ResNet50)
#                  and a config that does not fit, or cannot run there, creates nothing
# The trainer reads ArrayRecord through POSIX paths only: it gets HN_DATA_DIR=~/hn_data.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME="${NAME:-hn-jax}"
ZONE="${ZONE:-us-central2-b}"
TYPE="${TYPE:-v4-32}"
VERSION="${VERSION:-tpu-ubuntu2204-base}"
SPOT="${SPOT:-}"
SERVICE_ACCOUNT="${SERVICE_ACCOUNT:-}"
REPO_URL="${REPO_URL:-}"
DATASETS="${DATASETS:-all}"
DATA_MODE="${DATA_MODE:-copy}"
WORKER_PYTHON="${WORKER_PYTHON:-python3.11}"

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
  exit "${1:-2}"
}

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 1
}

[[ $# -ge 1 ]] || usage >&2
action="$1"
shift
if [[ $# -gt 0 && "$1" == "--" ]]; then
  shift
fi
case "$action" in
  create|install|run|stop|delete|all) ;;
  -h|--help) usage 0 ;;
  *) echo "tpu_pod.sh: unknown action '$action'" >&2; usage >&2 ;;
esac

BUCKET="${BUCKET:-}"
[[ "$BUCKET" == gs://?* ]] || die "set BUCKET=gs://your-bucket (the bucket holding data/ and runs/)"
BUCKET="${BUCKET%/}"
WORKDIR="${WORKDIR:-$BUCKET/runs/$NAME}"
[[ "$DATA_MODE" == copy || "$DATA_MODE" == mount ]] \
  || die "DATA_MODE must be copy or mount, not '$DATA_MODE'"
for arg in "$@"; do
  case "$arg" in
    --workdir|--workdir=*)
      die "give the workdir as WORKDIR=..., not $arg (the launcher sets --workdir)" ;;
    --config.data_dir|--config.data_dir=*)
      die "$arg: the trainer reads a local copy or mount of \$BUCKET/data (HN_DATA_DIR); drop it" ;;
  esac
done

# Shell assignments `name=value; ...` with every value quoted for the workers' shell.
assign() {
  while [[ $# -ge 2 ]]; do
    printf '%s=%q; ' "$1" "$2"
    shift 2
  done
}

# Runs a bash command line on every worker of the slice at once (each from its home folder).
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$1"
}

exists() {
  gcloud compute tpus tpu-vm describe "$NAME" --zone="$ZONE" >/dev/null 2>&1
}

preflight() {
  local configs=() arg
  [[ "${PREFLIGHT:-1}" != 0 ]] || return 0
  for arg in "$@"; do
    [[ "$arg" != --config=* && "$arg" != --config.* ]] || configs+=("$arg")
  done
  if [[ ${#configs[@]} -eq 0 ]]; then
    echo "tpu_pod.sh: no --config among the arguments: the preflight is skipped" >&2
    return 0
  fi
  echo "tpu_pod.sh: preflight: compiling the run for $TYPE (PREFLIGHT=0 skips)" >&2
  (cd "$ROOT" && python -m hn_jax.preflight --topology="$TYPE" --search_batch=false \
    "${configs[@]}") || die "the preflight says this run cannot run on $TYPE (above); nothing was created"
}

create() {
  local extra=()
  if [[ -n "$SPOT" ]]; then
    extra+=(--spot)
  fi
  if [[ -n "$SERVICE_ACCOUNT" ]]; then
    extra+=(--service-account="$SERVICE_ACCOUNT")
  fi
  # The workers reach the bucket as the slice's service account, with this scope.
  gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" --accelerator-type="$TYPE" \
    --version="$VERSION" --scopes=https://www.googleapis.com/auth/cloud-platform \
    ${extra[@]+"${extra[@]}"}
}

# Python and its venv, the packages of requirements.txt with JAX's TPU build (torch left out:
# it only reads .pth files; convert them to .npz first), gcsfuse for DATA_MODE=mount.
read -r -d '' INSTALL_SCRIPT <<'EOF' || true
set -e
packages="$python $python-venv"
setup="export DEBIAN_FRONTEND=noninteractive"
if [ "$mode" = mount ]; then
  repo=https://packages.cloud.google.com/apt
  key=/usr/share/keyrings/cloud.google.asc
  setup="$setup && curl -fsSL $repo/doc/apt-key.gpg > $key"
  setup="$setup && echo \"deb [signed-by=$key] $repo gcsfuse-\$(lsb_release -c -s) main\""
  setup="$setup > /etc/apt/sources.list.d/gcsfuse.list"
  packages="$packages gcsfuse"
fi
sudo bash -c "$setup && apt-get update -qq && apt-get install -y -qq $packages"
cd hn_jax
"$python" -m venv .venv
. .venv/bin/activate
grep -v -e '^torch==' -e '^jax-cuda12' requirements.txt > .venv/requirements-tpu.txt
jax_version=$(sed -n 's/^jax==//p' requirements.txt)
pip install -q -r .venv/requirements-tpu.txt "jax[tpu]==$jax_version" \
  -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
EOF

install() {
  local fetch
  if [[ -n "$REPO_URL" ]]; then
    # shellcheck disable=SC2016  # expanded on the workers
    fetch="$(assign url "$REPO_URL")"'if [ -d hn_jax/.git ]; then git -C hn_jax pull --ff-only;
      else git clone --depth 1 "$url" hn_jax; fi'
  else
    git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1 \
      || die "$ROOT is not a git checkout: set REPO_URL"
    local tmp
    tmp="$(mktemp -d)"
    # The files git would commit (tracked and untracked, not ignored) that exist.
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
      | while IFS= read -r -d '' f; do [[ -e "$f" ]] && printf '%s\0' "$f"; done \
      | tar -czf "$tmp/hn_jax.tar.gz" --null -T -)
    gcloud compute tpus tpu-vm scp --zone="$ZONE" --worker=all "$tmp/hn_jax.tar.gz" \
      "$NAME":hn_jax.tar.gz
    rm -rf "$tmp"
    fetch='mkdir -p hn_jax && tar -xzf hn_jax.tar.gz -C hn_jax && rm hn_jax.tar.gz'
  fi
  on_all_workers "set -e
$fetch
$(assign python "$WORKER_PYTHON" mode "$DATA_MODE")$INSTALL_SCRIPT"
}

# On each worker: refuse while a previous run still lives, make the data local, then train.
read -r -d '' RUN_SCRIPT <<'EOF' || true
set -e
cd hn_jax
if [ -f run.pid ] && grep -qs hn_jax.main "/proc/$(cat run.pid)/cmdline"; then
  echo "$(hostname): a run is still going (pid $(cat run.pid)): launch/tpu_pod.sh stop" >&2
  exit 1
fi
data="$HOME/hn_data"
mkdir -p "$data"
if [ "$mode" = mount ]; then
  mountpoint -q "$data" \
    || gcsfuse --implicit-dirs -o ro --only-dir "$only_dir" "$bucket_name" "$data"
elif [ "$datasets" = all ]; then
  gcloud storage rsync --recursive "$bucket/data" "$data"
elif [ "$datasets" != none ]; then
  for d in $datasets; do
    gcloud storage rsync --recursive "$bucket/data/$d" "$data/$d"
  done
fi
. .venv/bin/activate
echo $$ > run.pid
export HN_DATA_DIR="$data"
exec python -m hn_jax.main --distributed=yes --workdir="$workdir"
EOF

run() {
  local bucket_path="${BUCKET#gs://}"
  local bucket_name="${bucket_path%%/*}"
  local prefix=""
  if [[ "$bucket_path" == */* ]]; then
    prefix="${bucket_path#*/}/"
  fi
  local args=""
  if [[ $# -gt 0 ]]; then
    args=" $(printf '%q ' "$@")"
  fi
  on_all_workers "$(assign bucket "$BUCKET" bucket_name "$bucket_name" only_dir "${prefix}data" \
    mode "$DATA_MODE" datasets "$DATASETS" workdir "$WORKDIR")$RUN_SCRIPT$args"
}

stop() {
  # shellcheck disable=SC2016  # expanded on the workers
  on_all_workers 'pid=$(cat hn_jax/run.pid 2>/dev/null) \
    && grep -qs hn_jax.main "/proc/$pid/cmdline" && kill -TERM "$pid" || true'
}

delete() {
  gcloud compute tpus tpu-vm delete "$NAME" --zone="$ZONE" --quiet
}

# `all`'s exit, however it comes (failure, Ctrl-C, success): delete the slice if one exists
# (`all` made sure none did before it started) and keep the first failure's status.
# shellcheck disable=SC2317  # invoked by the trap
finish() {
  local status=$?
  trap - EXIT INT TERM
  if exists; then
    echo "tpu_pod.sh: deleting slice $NAME" >&2
    if ! delete; then
      echo "tpu_pod.sh: could not delete slice $NAME, which is billed until deleted:" \
        "gcloud compute tpus tpu-vm delete $NAME --zone=$ZONE" >&2
      [[ $status -ne 0 ]] || status=1
    fi
  fi
  exit "$status"
}

case "$action" in
  create) preflight "$@"; create ;;
  install) install ;;
  run) run "$@" ;;
  stop) stop ;;
  delete) delete ;;
  all)
    if exists; then
      die "slice $NAME already exists in $ZONE: use run on it, or delete it first"
    fi
    preflight "$@"
    trap finish EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    # A failed create may still leave a slice (e.g. one that failed while starting): finish
    # deletes it.
    create || die "could not create slice $NAME"
    install
    run "$@"
    ;;
esac
