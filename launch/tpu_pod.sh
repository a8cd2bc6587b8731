#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: create it, install, run on every worker, tear down.
#
# Usage: launch/tpu_pod.sh create|install|run|delete|all -- ARGS...
#   e.g. NAME=hn-pod ZONE=us-central2-b TYPE=v4-32 BUCKET=gs://my-bucket \
#        launch/tpu_pod.sh all -- --config=configs/sop.py
# Data is read from $BUCKET/data (prepared with `python -m hn_jax.prepare ... --data_dir=`)
# and the workdir is $BUCKET/runs/$NAME, so every worker sees both. jax.distributed needs
# no flags on a TPU pod: each worker finds the others by itself. Spot/preemptible slices
# send SIGTERM before reclaiming: the run checkpoints and `run` again resumes it.
set -euo pipefail

NAME="${NAME:-hn-jax}"
ZONE="${ZONE:-us-central2-b}"
TYPE="${TYPE:-v4-32}"
VERSION="${VERSION:-tpu-ubuntu2204-base}"
BUCKET="${BUCKET:?set BUCKET=gs://your-bucket}"
REPO_URL="${REPO_URL:-}"  # where workers clone hn_jax from; empty: copy this checkout
SPOT="${SPOT:-}"          # non-empty: request a spot slice

usage() {
  sed -n '2,12{s/^# \{0,1\}//;p}' "$0" >&2
  exit 2
}

[[ $# -ge 1 ]] || usage
action="$1"
shift
if [[ $# -gt 0 && "$1" == "--" ]]; then
  shift
fi

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$1"
}

create() {
  local extra=()
  if [[ -n "$SPOT" ]]; then
    extra+=(--spot)
  fi
  gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" --accelerator-type="$TYPE" \
    --version="$VERSION" "${extra[@]}"
}

install() {
  if [[ -n "$REPO_URL" ]]; then
    on_all_workers "git clone --depth 1 '$REPO_URL' hn_jax || (cd hn_jax && git pull)"
  else
    gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all . "$NAME":hn_jax
  fi
  on_all_workers "cd hn_jax && python3 -m venv .venv && . .venv/bin/activate && \
pip install -q -r requirements.txt && pip install -q 'jax[tpu]==$(grep '^jax==' requirements.txt | cut -d= -f3)' \
-f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
}

run() {
  local args
  args=$(printf '%q ' "$@")
  on_all_workers "cd hn_jax && . .venv/bin/activate && HN_DATA_DIR='$BUCKET/data' \
python -m hn_jax.main --distributed=yes --workdir='$BUCKET/runs/$NAME' $args"
}

delete() {
  gcloud compute tpus tpu-vm delete "$NAME" --zone="$ZONE" --quiet
}

case "$action" in
  create) create ;;
  install) install ;;
  run) run "$@" ;;
  delete) delete ;;
  all)
    create
    trap delete EXIT
    install
    run "$@"
    ;;
  *) usage ;;
esac
