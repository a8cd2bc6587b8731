#!/usr/bin/env bash
# Every GPU figure of issues 4, 8 and 13 in one call of a short device session (one H100):
#   bash benchmarks/device_check.sh              # writes JSON and logs to $OUT (or /tmp/device_check)
#   bash benchmarks/device_check.sh --smoke      # tiny sizes, on any machine, to test this script
#   bash benchmarks/device_check.sh --loop       # step 4 alone (the whole script runs ~15 min)
# Steps, each under its own time limit so that one slow step cannot starve the others:
#   1. evaluation at the accelerator sizes (60,502 self; 17,954 x 1,027,871), ~2 min
#   2. the JAX train step, float32 and bfloat16, batch 128 and 512, ~4 min
#   3. the PyTorch step, eager then torch.compile, ~4 min
#   4. the training loop (cached input, transfer, step) against the step alone: ResNet50
#      bfloat16, batch 128 and 512, ~3 min
# Only JAX (and PyTorch for step 3) are needed: nothing here imports TensorFlow, TFDS or CLU.
set -uo pipefail

out="${OUT:-/tmp/device_check}"
mkdir -p "$out"
cd "$(dirname "$0")/.." || exit 1

smoke=0
loop_only=0
if [[ "${1:-}" == "--smoke" ]]; then
  smoke=1
elif [[ "${1:-}" == "--loop" ]]; then
  loop_only=1
fi

run() {  # run NAME SECONDS COMMAND...: logs to $out/NAME.log, never stops the script
  local name="$1" seconds="$2"
  shift 2
  echo "== $name (limit ${seconds}s): $*"
  local start=$SECONDS
  timeout "$seconds" "$@" >"$out/$name.log" 2>&1
  local status=$?
  echo "== $name: exit $status after $((SECONDS - start))s"
  tail -n 25 "$out/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
python -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee "$out/jax.txt"

if ((smoke)); then
  run evaluation 300 python benchmarks/evaluation.py --quick --device-loop \
    --methods=ours,ours-jit,xla-gemm --json="$out/evaluation.json"
  run train_step 300 python benchmarks/train_step.py --tiny --frameworks=jax \
    --json="$out/train_step_jax.json"
  run train_loop 300 python benchmarks/train_loop.py --image_size=32 --batch=16 --classes=40 \
    --steps=3 --rounds=1 --json="$out/train_loop.json"
  exit 0
fi
train_loop() {
  run train_loop 300 python benchmarks/train_loop.py --model=resnet50 --dtype=bfloat16 \
    --batch=128,512 --classes=400 --steps=20 --warmup=3 --json="$out/train_loop.json"
}
if ((loop_only)); then
  train_loop
  exit 0
fi
run evaluation 170 python benchmarks/evaluation.py --gpu-sizes --json="$out/evaluation.json"
run train_step_jax 250 python benchmarks/train_step.py --frameworks=jax \
  --json="$out/train_step_jax.json"
run train_step_torch 170 python benchmarks/train_step.py --frameworks=torch \
  --json="$out/train_step_torch.json"
train_loop
