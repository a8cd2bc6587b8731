#!/usr/bin/env bash
# Every accelerator figure in one call of at most 8 minutes on one H100/H200 (issue 24):
#   bash benchmarks/device_check.sh            # JSON, logs and the final table in $OUT (/tmp/device_check)
#   bash benchmarks/device_check.sh --smoke    # tiny sizes, any CPU machine, a few minutes
#   bash benchmarks/device_check.sh --plan     # print the steps and their limits, run nothing
#   bash benchmarks/device_check.sh --only=train_loop,evaluation   # some steps alone
#   bash benchmarks/device_check.sh --only=backbones   # a second call: env, the backbones, summary
#
# Steps, in order of value, each under its own time limit (seconds; the limits add up to 450):
#   env               15  GPU, versions, JAX's devices (and that TensorFlow, TFDS, CLU are absent)
#   train_step_jax   145  JAX ResNet50 train step, 256 px: bf16 b128, f32 b128, bf16 b512 (one
#                         process, in that order: the peak memory of each is then its own)
#   train_step_torch 105  PyTorch beside it, batch 128, channels-last: eager f32, eager bf16,
#                         torch.compile bf16 (one process, compile last)
#   train_loop        95  the cached training loop against the step alone, bf16 b128 and b512
#                         (its data is made while the b128 step compiles)
#   evaluation        45  recall of 60,502 x 512 (self) and 17,954 x 1,027,871 x 256
#   pretrained        35  hn_jax.pretrained against this machine's torchvision (resnet50, resnet18)
#   summary           10  the final table: every figure beside its target
# Opt-in (issue 23; the 450 s above leave no room for them): the new backbones' train steps,
# 224 px, batch 128, JAX bf16 then f32, PyTorch eager f32 then bf16 channels-last (torchvision's
# googlenet, timm's ViTs, or the same layouts from hn_jax.testing.torch_reference), each
# framework its own step. Run by `--only=backbones` (with env and summary: 415 s, one call of
# its own) or by naming them in --only; BACKBONES=1 adds them to the full run (then 840 s: a
# longer call than the eight minutes).
#   backbone_googlenet_jax   100     backbone_googlenet_torch  40
#   backbone_vit_s16_jax      80     backbone_vit_s16_torch    35
#   backbone_vit_b16_jax      90     backbone_vit_b16_torch    45
# A step that ends early leaves its unused seconds to the steps after it (each step may run
# for the sum of the limits so far minus the time already spent, never less than its own
# limit unless an earlier step overran), so the whole run stays within the 450 s and a slow
# step cannot starve the rest. Every step writes its JSON as it goes: a step cut by its
# limit keeps the configurations it finished. Peak device memory of each configuration is in
# the JSON and the table (JAX: memory_stats() peak_bytes_in_use; torch:
# max_memory_allocated).
#
# Compiled programs are cached for the call (JAX_COMPILATION_CACHE_DIR, a fresh folder under
# /tmp unless set; with it XLA's per-fusion autotuning results, so the loop's ResNet50 convs
# reuse the tuning of train_step_jax's). Every Python process runs with
# benchmarks/device_check_hooks/sitecustomize.py, which records any import of tensorflow,
# tensorflow_datasets or clu into $OUT/forbidden_imports.jsonl (the table reports them).
# The table reads every step's JSON in $OUT: with --only, those of steps an earlier call left
# there too (each step removes its own before it runs).
# Python: $PYTHON, else `python`, else `python3` on PATH.
# Exit status: 0 when every step exited 0 (targets missed are figures, not errors).
set -uo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/.." || exit 1

mode=full
only=""
plan=0
for arg in "$@"; do
  case "$arg" in
    --smoke) mode=smoke ;;
    --plan) plan=1 ;;
    --only=*) only="${arg#--only=}" ;;
    --loop) only=train_loop ;;  # the older spelling
    -h | --help)
      sed -n '2,/^set -uo/p' "$0" | sed '$d'
      exit 0
      ;;
    *)
      echo "unknown argument: $arg (see --help)" >&2
      exit 2
      ;;
  esac
done

# name, limit (full run), limit (--smoke), [opt: run only when asked for]
STEPS=(
  "env 15 60"
  "train_step_jax 145 300"
  "train_step_torch 105 300"
  "train_loop 95 300"
  "evaluation 45 300"
  "pretrained 35 300"
  "backbone_googlenet_jax 100 120 opt"
  "backbone_googlenet_torch 40 120 opt"
  "backbone_vit_s16_jax 80 120 opt"
  "backbone_vit_s16_torch 35 120 opt"
  "backbone_vit_b16_jax 90 120 opt"
  "backbone_vit_b16_torch 45 120 opt"
  "summary 10 60"
)
if [[ ",$only," == *",backbones,"* ]]; then  # the backbones' own call
  only+=",env"
  for entry in "${STEPS[@]}"; do
    read -r name _ _ _ <<<"$entry"
    [[ $name == backbone_* ]] && only+=",$name"
  done
fi

selected() {  # selected NAME [opt]: whether this run takes the step
  local name="$1" opt="${2:-}"
  [[ $name == summary || ",$only," == *",$name,"* ]] && return 0
  if [[ -n $opt ]]; then  # opt-in: named by --only, or BACKBONES=1 with no --only
    [[ -z "$only" && "${BACKBONES:-0}" == 1 ]]
    return
  fi
  [[ -z "$only" ]]
}

if ((plan)); then
  total=0
  for entry in "${STEPS[@]}"; do
    read -r name full smoke opt <<<"$entry"
    selected "$name" "$opt" || continue
    limit=$full
    [[ $mode == smoke ]] && limit=$smoke
    printf '%-24s %4ds\n' "$name" "$limit"
    total=$((total + limit))
  done
  printf '%-24s %4ds\n' total "$total"
  exit 0
fi

python="${PYTHON:-$(command -v python || command -v python3)}"  # the one of the active venv
if [[ -z "$python" ]]; then
  echo "no python on PATH (set PYTHON)" >&2
  exit 2
fi
out="${OUT:-/tmp/device_check}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
: >"$out/steps.tsv"
: >"$out/forbidden_imports.jsonl"

if [[ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]]; then
  JAX_COMPILATION_CACHE_DIR="$(mktemp -d /tmp/hn_device_check_xla_cache.XXXXXX)"
  trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
fi
export JAX_COMPILATION_CACHE_DIR
export PYTHONPATH="$here/device_check_hooks${PYTHONPATH:+:$PYTHONPATH}"
export HN_FORBIDDEN_IMPORTS_LOG="$out/forbidden_imports.jsonl"
export PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
if [[ $mode == smoke ]]; then
  # A CPU smoke test: XLA's quickest backend optimization (the figures mean nothing anyway).
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0"
fi

planned=0  # sum of the limits of the steps run so far
failed=0
step() {  # step NAME LIMIT COMMAND...: logs to $out/NAME.log; never stops the script
  local name="$1" limit="$2"
  shift 2
  planned=$((planned + limit))
  local allowed=$((planned - SECONDS))
  ((allowed < 5)) && allowed=5
  echo "== $name (limit ${limit}s, allowed ${allowed}s, at ${SECONDS}s): $*"
  local start=$SECONDS
  rm -f "$out/$name.json"  # no figure of an earlier run under this step's name
  timeout -k 5 "$allowed" "$@" >"$out/$name.log" 2>&1
  local status=$?
  local took=$((SECONDS - start))
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$limit" "$allowed" "$status" "$took" >>"$out/steps.tsv"
  local note=""
  ((status == 124 || status == 137)) && note=" (TIME LIMIT)"
  if [[ $mode == smoke && $name == pretrained && $status == 2 ]]; then
    note=" (skipped: no torch here)"  # a CPU machine may lack it; the device has it
  elif ((status != 0)); then
    failed=1
  fi
  echo "== $name: exit $status after ${took}s$note"
  [[ $name == summary ]] || tail -n 8 "$out/$name.log"
}

if [[ $mode == smoke ]]; then
  torch_configs="torch:eager:float32:16,torch:eager:bfloat16:16"
  if [[ "${SMOKE_TORCH_COMPILE:-0}" == 1 ]]; then  # a cold torch.compile: minutes on a CPU
    torch_configs+=",torch:compile:bfloat16:16"
  fi
  jax_configs="jax:jit:bfloat16:16,jax:jit:float32:16,jax:jit:bfloat16:32"
  step_args=(--smoke --steps=2 --warmup=1)
  loop_args=(--model=small --image_size=32 "--batch=16,32" --classes=40 --steps=3 --warmup=1
             --rounds=1)
  eval_args=(--smoke --device-loop --methods=ours-jit)  # the accelerator's path, on a CPU
  pretrained_args=(--models=resnet18 --image_size=64 --batch=2)
  summary_args=(--smoke --ratio_batch=16 --big_batch=32)
  # The backbones' tiny variants (hn_jax's googlenet_mini and vit_mini; torch: the references).
  backbone_models=(googlenet_mini vit_mini vit_mini)
  backbone_size=32
  backbone_jax="jax:jit:bfloat16:16,jax:jit:float32:16"
  backbone_torch="torch:eager:float32:16,torch:eager:bfloat16:16"
else
  torch_configs="torch:eager:float32:128,torch:eager:bfloat16:128,torch:compile:bfloat16:128"
  jax_configs="jax:jit:bfloat16:128,jax:jit:float32:128,jax:jit:bfloat16:512"
  step_args=(--steps=20 --warmup=3)
  loop_args=(--model=resnet50 --image_size=256 "--batch=128,512" --classes=300 --steps=20
             --warmup=3 --rounds=2)
  eval_args=(--gpu-sizes --methods=ours)
  pretrained_args=("--models=resnet50,resnet18" --image_size=224 --batch=8)
  summary_args=(--ratio_batch=128 --big_batch=512)
  backbone_models=(googlenet vit_small_patch16 vit_base_patch16)
  backbone_size=224
  backbone_jax="jax:jit:bfloat16:128,jax:jit:float32:128"
  backbone_torch="torch:eager:float32:128,torch:eager:bfloat16:128"
fi

for entry in "${STEPS[@]}"; do
  read -r name full smoke opt <<<"$entry"
  selected "$name" "$opt" || continue
  limit=$full
  [[ $mode == smoke ]] && limit=$smoke
  case "$name" in
    env)
      step env "$limit" "$python" benchmarks/device_summary.py env --json="$out/env.json" ;;
    train_step_jax)
      step train_step_jax "$limit" "$python" benchmarks/train_step.py "${step_args[@]}" \
        --configs="$jax_configs" --json="$out/train_step_jax.json" ;;
    train_step_torch)
      step train_step_torch "$limit" "$python" benchmarks/train_step.py "${step_args[@]}" \
        --configs="$torch_configs" --torch_channels_last=all --json="$out/train_step_torch.json" ;;
    train_loop)
      step train_loop "$limit" "$python" benchmarks/train_loop.py "${loop_args[@]}" \
        --dtype=bfloat16 --json="$out/train_loop.json" ;;
    evaluation)
      step evaluation "$limit" "$python" benchmarks/evaluation.py "${eval_args[@]}" \
        --json="$out/evaluation.json" ;;
    pretrained)
      step pretrained "$limit" "$python" benchmarks/pretrained_check.py "${pretrained_args[@]}" \
        --json="$out/pretrained.json" ;;
    backbone_*)
      case "$name" in
        backbone_googlenet_*) model=${backbone_models[0]} ;;
        backbone_vit_s16_*) model=${backbone_models[1]} ;;
        *) model=${backbone_models[2]} ;;
      esac
      if [[ $name == *_jax ]]; then
        configs=$backbone_jax
      else
        configs=$backbone_torch
      fi
      step "$name" "$limit" "$python" benchmarks/train_step.py "${step_args[@]}" \
        --jax_model="$model" --image_size="$backbone_size" --configs="$configs" \
        --torch_channels_last=all --json="$out/$name.json" ;;
    summary)
      step summary "$limit" "$python" benchmarks/device_summary.py table --out="$out" \
        "${summary_args[@]}" ;;
  esac
done
echo
cat "$out/summary.log"
echo "total ${SECONDS}s; logs and JSON in $out"
exit "$failed"
