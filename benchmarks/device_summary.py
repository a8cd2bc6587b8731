"""The environment and the final table of benchmarks/device_check.sh (issue 24).

    python benchmarks/device_summary.py env --json=OUT/env.json
    python benchmarks/device_summary.py table --out=OUT [--smoke] [--ratio_batch=128 --big_batch=512]
    python benchmarks/device_summary.py --smoke [--json=FILE]

`--smoke` alone: `env` and `table` on a fresh temporary OUT (no step has run there, so every
figure is missing), to test the script wherever it is, with or without an accelerator.

`env`: the accelerator (nvidia-smi), Python, the versions of the packages the check uses,
whether TensorFlow, TFDS or CLU are installed (by distribution metadata: nothing is
imported), and JAX's devices.

`table`: reads the JSON that the steps wrote under OUT (any of them may be missing or
partial: a step cut by its time limit) and prints every figure beside its target, then the
peak device memory of every configuration, the compile times, the forbidden imports seen and
each step's exit status and time; also writes OUT/summary.json. The opt-in backbone steps'
rows (backbone_*.json) add a JAX / torch eager figure per model, dtype and batch (no target).
Only the standard library is imported, so the table prints even where JAX is broken.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

# The targets (issues 4, 5, 8, 13; one H100/H200, ResNet50 at 256 px, embedding 512, sct).
BF16_VS_COMPILE = 1.2
BF16_IMAGES_PER_S = 5500.0
F32_VS_EAGER = 1.5
BF16_VS_EAGER = 1.5  # issue 8 (the same precision and batch)
LOOP_OVER_STEP = 0.95
EVAL_SECONDS = 0.5
PARITY = 1e-4

PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "optax",
            "orbax-checkpoint", "numpy", "scipy", "torch", "torchvision", "triton")
FORBIDDEN_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tf-nightly", "tensorflow-datasets",
                           "tfds-nightly", "clu")
EVAL_CASES = (("self-60502x512", "self-retrieval 60,502 x 512"),
              ("17954x1027871x256", "17,954 x 1,027,871 x 256"))


# ---------------------------------------------------------------------------------------------
# env


def _version(name: str) -> str | None:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return None


def env(json_path: str) -> int:
  info: dict = dict(python=platform.python_version(), executable=sys.executable,
                    machine=platform.machine(), nproc=os.cpu_count())
  try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=20,
                         check=False)
    info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
  except (OSError, subprocess.TimeoutExpired) as e:
    info["nvidia_smi"] = f"unavailable: {e}"
  info["packages"] = {name: _version(name) for name in PACKAGES}
  info["forbidden_installed"] = [n for n in FORBIDDEN_DISTRIBUTIONS if _version(n)]
  print(f"python {info['python']} ({info['executable']}), {info['nproc']} cores")
  print(f"gpu: {info['nvidia_smi']}")
  print("packages: " + ", ".join(f"{k} {v}" for k, v in info["packages"].items() if v))
  print(f"tensorflow/tfds/clu installed: {info['forbidden_installed'] or 'none'}")
  status = 0
  try:
    import jax  # pylint: disable=import-outside-toplevel
    devices = jax.devices()
    info["jax_backend"] = jax.default_backend()
    info["jax_devices"] = [str(d) for d in devices]
    info["device_kind"] = devices[0].device_kind
    print(f"jax {jax.__version__}: {jax.default_backend()}, {len(devices)} device(s): "
          f"{devices[0].device_kind}")
  except Exception as e:  # pylint: disable=broad-except
    info["jax_error"] = f"{type(e).__name__}: {e}"
    print(f"jax failed: {info['jax_error']}")
    status = 1
  Path(json_path).write_text(json.dumps(info, indent=1) + "\n")
  return status


# ---------------------------------------------------------------------------------------------
# table


def _load(path: Path) -> dict | None:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _fmt(x, spec: str = ",.0f") -> str:
  return "-" if x is None else format(x, spec)


def _gib(nbytes) -> str:
  return "-" if nbytes is None else f"{nbytes / 2**30:.1f} GiB"


def _verdict(value, goal: float, at_least: bool, smoke: bool) -> str:
  if value is None:
    return "missing"
  if smoke:
    return "(smoke)"
  return "PASS" if (value >= goal if at_least else value < goal) else "FAIL"


def _ok(row: dict | None) -> bool:
  return row is not None and row.get("status", "ok") == "ok"


def collect(out: Path, ratio_batch: int, big_batch: int, smoke: bool = False) -> dict:
  """Every figure of the run in OUT, with its target and verdict."""
  step_rows = []
  for name in ("train_step_jax", "train_step_torch"):
    step_rows += (_load(out / f"{name}.json") or {}).get("rows", [])
  steps = {(r["framework"], r["mode"], r["dtype"], r["batch"]): r for r in step_rows}
  loop_rows = {(r["dtype"], r["batch"]): r
               for r in (_load(out / "train_loop.json") or {}).get("rows", [])}
  evals = {}  # "ours" (the smoke test runs "ours-jit": the accelerator's path on a CPU)
  for r in (_load(out / "evaluation.json") or {}).get("results", []):
    if r.get("method") in ("ours", "ours-jit") and "error" not in r:
      evals.setdefault(r["case"], r)
  pretrained = _load(out / "pretrained.json") or {}

  def ips(framework, mode, dtype, batch):
    row = steps.get((framework, mode, dtype, batch))
    return row["images_per_s"] if _ok(row) else None

  def ratio(a, b):
    return None if a is None or b is None else a / b

  figures = []

  def add(name, value, target, verdict, spec=",.0f", note=""):
    figures.append(dict(figure=name, value=value, text=_fmt(value, spec) + note,
                        target=target, verdict=verdict))

  b, big = ratio_batch, big_batch
  jax_bf16 = ips("jax", "jit", "bfloat16", b)
  jax_f32 = ips("jax", "jit", "float32", b)
  jax_big = ips("jax", "jit", "bfloat16", big)
  compile_bf16 = ips("torch", "compile", "bfloat16", b)
  eager_bf16 = ips("torch", "eager", "bfloat16", b)
  eager_f32 = ips("torch", "eager", "float32", b)
  add(f"JAX step bf16 b{b}, images/s", jax_bf16, "", "")
  add(f"torch.compile bf16 channels-last b{b}, images/s", compile_bf16, "", "")
  value = ratio(jax_bf16, compile_bf16)
  add(f"JAX / torch.compile, bf16 b{b}", value, f">= {BF16_VS_COMPILE}",
      _verdict(value, BF16_VS_COMPILE, True, smoke), ".2f")
  add(f"torch eager bf16 channels-last b{b}, images/s", eager_bf16, "", "")
  value = ratio(jax_bf16, eager_bf16)
  add(f"JAX / torch eager, bf16 b{b}", value, f">= {BF16_VS_EAGER}",
      _verdict(value, BF16_VS_EAGER, True, smoke), ".2f")
  note, value = "", jax_big
  loop_big = loop_rows.get(("bfloat16", big))
  if value is None and loop_big is not None:  # the loop's step alone is the same step
    value, note = loop_big["step_images_per_s"], " (train_loop's step alone)"
  add(f"JAX step bf16 b{big}, images/s", value, f">= {BF16_IMAGES_PER_S:,.0f}",
      _verdict(value, BF16_IMAGES_PER_S, True, smoke), note=note)
  add(f"JAX step f32 b{b}, images/s", jax_f32, "", "")
  add(f"torch eager f32 channels-last b{b}, images/s", eager_f32, "", "")
  value = ratio(jax_f32, eager_f32)
  add(f"JAX / torch eager, f32 b{b}", value, f">= {F32_VS_EAGER}",
      _verdict(value, F32_VS_EAGER, True, smoke), ".2f")
  for batch in (b, big):
    row = loop_rows.get(("bfloat16", batch))
    value = row.get("loop_over_step") if row else None
    note = "" if row is None else (f" ({row['loop_images_per_s']:,.0f} vs "
                                   f"{row['step_images_per_s']:,.0f} images/s)")
    add(f"loop / step alone, bf16 b{batch}", value, f">= {LOOP_OVER_STEP}",
        _verdict(value, LOOP_OVER_STEP, True, smoke), ".3f", note)
  cases = EVAL_CASES if not smoke else tuple((c, c) for c in sorted(evals))
  for case, label in cases:
    r = evals.get(case, {})
    value = r.get("steady_s")
    note = "" if not r else (f" s (first call {_fmt(r.get('first_s'), '.2f')} s, ranking "
                             f"alone {_fmt(r.get('device_s'), '.3f')} s)")
    add(f"evaluation {label}, end to end", value, f"< {EVAL_SECONDS} s",
        _verdict(value, EVAL_SECONDS, False, smoke), ".3f", note)
  for model in pretrained.get("models", []):
    value = model.get("rel_err_highest")
    verdict = "missing" if value is None else ("PASS" if value <= PARITY else "FAIL")
    reference = pretrained.get("reference", pretrained.get("torchvision", "?"))
    add(f"{reference} parity, {model['name']}", value,
        f"<= {PARITY:g}", verdict, ".1e",
        f" (default precision {_fmt(model.get('rel_err_default'), '.1e')})")
  if not pretrained.get("models"):
    add("torchvision parity", None, f"<= {PARITY:g}",
        "skipped" if pretrained.get("skipped") else "missing",
        note=f" ({pretrained['skipped']})" if pretrained.get("skipped") else "")

  backbone_rows = []  # device_check.sh's opt-in backbone steps (issue 23): figures, no targets
  for path in sorted(out.glob("backbone_*.json")):
    backbone_rows += (_load(path) or {}).get("rows", [])
  backbones = {(r.get("model"), r["framework"], r["mode"], r["dtype"], r["batch"]): r
               for r in backbone_rows}
  for (model, framework, _, dtype, batch), r in sorted(backbones.items(), key=str):
    if framework != "jax":
      continue
    jax_ips = r["images_per_s"] if _ok(r) else None
    t = backbones.get((model, "torch", "eager", dtype, batch))
    torch_ips = t["images_per_s"] if _ok(t) else None
    add(f"{model} JAX / torch eager, {dtype} b{batch}", ratio(jax_ips, torch_ips), "", "",
        ".2f", f" ({_fmt(jax_ips)} vs {_fmt(torch_ips)} images/s)")

  memory = []
  for r in step_rows + backbone_rows:
    peak = r.get("peak_bytes_in_use", r.get("max_memory_allocated"))
    model = f"{r['model']} " if r in backbone_rows else ""
    memory.append(dict(what=f"{model}{r['framework']} {r['mode']} {r['dtype']} b{r['batch']}",
                       status=r.get("status"), peak=peak, compile_s=r.get("compile_s")))
  for r in loop_rows.values():
    memory.append(dict(what=f"loop {r['dtype']} b{r['batch']}", status="ok",
                       peak=r.get("peak_bytes_in_use"), compile_s=r.get("compile_s")))
  for case, r in evals.items():
    mb = r.get("device_peak_mb")
    memory.append(dict(what=f"evaluation {case}", status="ok",
                       peak=None if mb is None else mb * 2**20, compile_s=None))

  forbidden = []
  log = out / "forbidden_imports.jsonl"
  if log.exists():
    for line in log.read_text().splitlines():
      try:
        forbidden.append(json.loads(line))
      except ValueError:
        pass
  imported = sorted({f["module"] for f in forbidden if f.get("kind") in ("import", "loaded")})
  if log.exists():  # device_check.sh creates it before the first step
    figures.append(dict(figure="tensorflow/tfds/clu imported", value=len(imported),
                        text=", ".join(imported) or "none", target="none",
                        verdict="PASS" if not imported else "FAIL"))
  else:
    figures.append(dict(figure="tensorflow/tfds/clu imported", value=None, text="-",
                        target="none", verdict="missing"))
  steps_run = []
  tsv = out / "steps.tsv"
  if tsv.exists():
    for line in tsv.read_text().splitlines():
      name, limit, allowed, status, took = line.split("\t")
      steps_run.append(dict(step=name, limit=int(limit), allowed=int(allowed),
                            status=int(status), seconds=int(took)))
  return dict(smoke=smoke, figures=figures, memory=memory, forbidden_imports=forbidden,
              steps=steps_run, env=_load(out / "env.json"))


def format_table(result: dict) -> str:
  lines = []
  env_info = result.get("env") or {}
  if env_info:
    packages = env_info.get("packages", {})
    gpu = env_info.get("nvidia_smi") or ""
    if not gpu or gpu.startswith("unavailable"):
      gpu = f"no nvidia-smi; JAX on {env_info.get('device_kind', '?')}"
    lines.append(f"{gpu}; python "
                 f"{env_info.get('python')}, jax {packages.get('jax')}, flax "
                 f"{packages.get('flax')}, torch {packages.get('torch')}, torchvision "
                 f"{packages.get('torchvision')}, numpy {packages.get('numpy')}")
  if result["smoke"]:
    lines.append("--smoke: tiny sizes; the figures test the script, they measure nothing")
  rows = [("figure", "value", "target", "verdict")]
  rows += [(f["figure"], f["text"], f["target"], f["verdict"]) for f in result["figures"]]
  lines += _markdown(rows)
  lines.append("")
  rows = [("peak device memory", "peak", "compile s", "status")]
  rows += [(m["what"], _gib(m["peak"]), _fmt(m["compile_s"], ".1f"), str(m["status"]))
           for m in result["memory"]]
  lines += _markdown(rows)
  lines.append("(JAX: peak_bytes_in_use of the step's process, whose configurations run in "
               "order of size; torch: max_memory_allocated per configuration)")
  seen = result["forbidden_imports"]
  imports = [f for f in seen if f.get("kind") in ("import", "loaded")]
  probes = sorted({f"{f['module']} by {f['importer']}" for f in seen if f.get("kind") == "probe"})
  where = sorted({f"{f['module']} by {f['importer']}" for f in imports})
  lines.append(f"tensorflow/tfds/clu: {'none imported' if not imports else 'IMPORTED'}"
               + (": " + "; ".join(where[:5]) if where else "")
               + (f" (find_spec probes only, which find nothing on the device machine: "
                  f"{'; '.join(probes[:3])})" if probes else ""))
  steps = result["steps"]
  if steps:
    lines.append("steps: " + ", ".join(
        f"{s['step']} {s['seconds']}/{s['allowed']}s"
        + ("" if s["status"] == 0 else f" exit {s['status']}"
           + (" TIME LIMIT" if s["status"] in (124, 137) else "")) for s in steps)
                 + f"; {sum(s['seconds'] for s in steps)}s in all")
  return "\n".join(lines)


def _markdown(rows: list[tuple[str, ...]]) -> list[str]:
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  text = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
  text.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
  return text


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--smoke", action="store_true",
                      help="alone: env and table on a temporary OUT (tests the script)")
  parser.add_argument("--json", default=None, help="with --smoke alone: where the summary goes")
  sub = parser.add_subparsers(dest="command")
  p_env = sub.add_parser("env")
  p_env.add_argument("--json", required=True)
  p_table = sub.add_parser("table")
  p_table.add_argument("--out", required=True)
  p_table.add_argument("--smoke", action="store_true")
  p_table.add_argument("--ratio_batch", type=int, default=128)
  p_table.add_argument("--big_batch", type=int, default=512)
  args = parser.parse_args(argv)
  if args.command is None:
    if not args.smoke:
      parser.error("name a command (env or table), or pass --smoke alone")
    return _smoke(args.json)
  if args.command == "env":
    return env(args.json)
  out = Path(args.out)
  if not out.is_dir():
    print(f"device_summary: {out} is not a folder: pass --out=<the OUT of device_check.sh>",
          file=sys.stderr)
    return 2
  result = collect(out, args.ratio_batch, args.big_batch, args.smoke)
  print(format_table(result))
  (out / "summary.json").write_text(json.dumps(result, indent=1) + "\n")
  return 0


def _smoke(json_path: str | None) -> int:
  import tempfile  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory(prefix="device_summary_smoke_") as tmp:
    out = Path(tmp)
    status = env(str(out / "env.json"))
    result = collect(out, 128, 512, smoke=True)
    print(format_table(result))
    text = json.dumps(result, indent=1) + "\n"
    (Path(json_path) if json_path else out / "summary.json").write_text(text)
  return status


if __name__ == "__main__":
  sys.exit(main())
