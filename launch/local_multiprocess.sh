#!/usr/bin/env bash
# Several hn_jax processes on this machine, joined by jax.distributed over localhost.
#
# Usage: launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS -- ARGS...
#   e.g. launch/local_multiprocess.sh 2 2 -- --config=configs/digits.py --workdir=/tmp/hn_mp
# On a CPU host each process simulates DEVICES_PER_PROCESS devices; on a GPU host give each
# process its own GPUs instead (CUDA_VISIBLE_DEVICES) and set DEVICES_PER_PROCESS to 0.
# PORT (default 12355) is the coordinator's port; PYTHON the interpreter.
set -euo pipefail

if [[ $# -lt 3 || "$3" != "--" ]]; then
  sed -n '2,9{s/^# \{0,1\}//;p}' "$0" >&2
  exit 2
fi
num_processes="$1"
devices="$2"
shift 3
port="${PORT:-12355}"
python="${PYTHON:-python}"

pids=()
# shellcheck disable=SC2317  # invoked by the trap
cleanup() {
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
}
# A SIGTERM to this script reaches every process, which checkpoints and exits cleanly.
trap cleanup TERM INT

for ((i = 0; i < num_processes; i++)); do
  env_vars=()
  if [[ "$devices" -gt 0 ]]; then
    env_vars+=(JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=${devices}")
  fi
  env "${env_vars[@]}" "$python" -m hn_jax.main "$@" \
    --coordinator_address="localhost:${port}" --num_processes="$num_processes" \
    --process_id="$i" &
  pids+=("$!")
done

status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
