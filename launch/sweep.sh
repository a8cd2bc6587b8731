#!/usr/bin/env bash
# Sweep launcher for hn_jax: every method x learning rate x seed, one run after another.
#
# Each run is
#   $PYTHON -m hn_jax.main --config=$CONFIG \
#     --workdir=$ROOT/${DATA}_R50/<method>_B<batch>_R<repeat>_D<dim>_lr<lr>_lam<lam>/<seed>/ \
#     --config.loss=<method> --config.learning_rate=<lr> --config.seed=<seed> \
#     --config.batch_size=<batch> --config.repeat=<repeat> --config.embedding_dim=<dim> \
#     --config.lam=<lam> [EXTRA...]
# which is the release's layout, so `python -m hn_jax.tools.report $ROOT/${DATA}_R50` tabulates it.
#
# Usage: launch/sweep.sh [options] [--] [EXTRA args passed to hn_jax.main...]
# Every option also reads an environment variable of the same name (the flag wins):
#   --config FILE     CONFIG   config file              (default: configs/default.py)
#   --root DIR        ROOT     root of the work dirs     (default: runs)
#   --data NAME       DATA     dataset tag in the path   (default: CUB)
#   --methods "A B"   METHODS  losses                    (default: "sct shn hn")
#   --lrs "X Y"       LRS      learning rates, as typed  (default: "0.009 0.002")
#   --seeds "0 1"     SEEDS    seeds                     (default: "0 1 2 3 4")
#   --batch N         BATCH    batch size                (default: 128)
#   --repeat N        REPEAT   sampler repeat            (default: 1)
#   --dim N           DIM      embedding dimension       (default: 64)
#   --lam X           LAM      sct's lambda              (default: 1.0)
#   --python EXE      PYTHON   interpreter               (default: python)
#   --dry-run                  print the commands, run nothing
#   --keep-going               go on after a failed run (exit status 1 at the end)
# Unknown arguments, and everything after `--`, are passed through to hn_jax.main.
# Values are used verbatim in directory names (lr0.009, lam1.0): type them as you want them.
set -euo pipefail

CONFIG="${CONFIG:-configs/default.py}"
ROOT="${ROOT:-runs}"
DATA="${DATA:-CUB}"
METHODS="${METHODS:-sct shn hn}"
LRS="${LRS:-0.009 0.002}"
SEEDS="${SEEDS:-0 1 2 3 4}"
BATCH="${BATCH:-128}"
REPEAT="${REPEAT:-1}"
DIM="${DIM:-64}"
LAM="${LAM:-1.0}"
PYTHON="${PYTHON:-python}"
DRY_RUN=0
KEEP_GOING=0
EXTRA=()

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

die() {
  echo "sweep.sh: $*" >&2
  exit 2
}

need_value() {
  [[ $# -ge 2 ]] || die "option $1 needs a value"
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
    --root) need_value "$@"; ROOT="$2"; shift 2 ;;
    --data) need_value "$@"; DATA="$2"; shift 2 ;;
    --methods) need_value "$@"; METHODS="$2"; shift 2 ;;
    --lrs) need_value "$@"; LRS="$2"; shift 2 ;;
    --seeds) need_value "$@"; SEEDS="$2"; shift 2 ;;
    --batch) need_value "$@"; BATCH="$2"; shift 2 ;;
    --repeat) need_value "$@"; REPEAT="$2"; shift 2 ;;
    --dim) need_value "$@"; DIM="$2"; shift 2 ;;
    --lam) need_value "$@"; LAM="$2"; shift 2 ;;
    --python) need_value "$@"; PYTHON="$2"; shift 2 ;;
    --config=*) CONFIG="${1#*=}"; shift ;;
    --root=*) ROOT="${1#*=}"; shift ;;
    --data=*) DATA="${1#*=}"; shift ;;
    --methods=*) METHODS="${1#*=}"; shift ;;
    --lrs=*) LRS="${1#*=}"; shift ;;
    --seeds=*) SEEDS="${1#*=}"; shift ;;
    --batch=*) BATCH="${1#*=}"; shift ;;
    --repeat=*) REPEAT="${1#*=}"; shift ;;
    --dim=*) DIM="${1#*=}"; shift ;;
    --lam=*) LAM="${1#*=}"; shift ;;
    --python=*) PYTHON="${1#*=}"; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --keep-going) KEEP_GOING=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA+=("$@"); break ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done

read -r -a methods <<< "$METHODS"
read -r -a lrs <<< "$LRS"
read -r -a seeds <<< "$SEEDS"
[[ ${#methods[@]} -gt 0 ]] || die "no methods"
[[ ${#lrs[@]} -gt 0 ]] || die "no learning rates"
[[ ${#seeds[@]} -gt 0 ]] || die "no seeds"

total=$(( ${#methods[@]} * ${#lrs[@]} * ${#seeds[@]} ))
count=0
failed=0
for method in "${methods[@]}"; do
  for lr in "${lrs[@]}"; do
    group="${method}_B${BATCH}_R${REPEAT}_D${DIM}_lr${lr}_lam${LAM}"
    for seed in "${seeds[@]}"; do
      count=$(( count + 1 ))
      workdir="${ROOT%/}/${DATA}_R50/${group}/${seed}/"
      cmd=("$PYTHON" -m hn_jax.main
        "--config=${CONFIG}"
        "--workdir=${workdir}"
        "--config.loss=${method}"
        "--config.learning_rate=${lr}"
        "--config.seed=${seed}"
        "--config.batch_size=${BATCH}"
        "--config.repeat=${REPEAT}"
        "--config.embedding_dim=${DIM}"
        "--config.lam=${LAM}"
        ${EXTRA[@]+"${EXTRA[@]}"})
      if [[ $DRY_RUN -eq 1 ]]; then
        printf '%q' "${cmd[0]}"
        printf ' %q' "${cmd[@]:1}"
        printf '\n'
        continue
      fi
      echo "[sweep ${count}/${total}] ${workdir}" >&2
      if ! "${cmd[@]}"; then
        echo "[sweep ${count}/${total}] FAILED: ${workdir}" >&2
        failed=$(( failed + 1 ))
        [[ $KEEP_GOING -eq 1 ]] || exit 1
      fi
    done
  done
done

if [[ $failed -gt 0 ]]; then
  echo "sweep.sh: ${failed} of ${total} runs failed" >&2
  exit 1
fi
