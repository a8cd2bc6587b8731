"""benchmarks/device_check.sh (issue 24): its plan fits the eight-minute call, its table
reads what the steps write, its import recorder sees TensorFlow, and a stopped train-step
run keeps the configurations it finished.

The script itself (`--smoke`, two minutes on 2 cores) is not run here; these are its parts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hn_jax.testing import benchmarks

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "device_check.sh"
HOOKS = REPO / "benchmarks" / "device_check_hooks"


summary = benchmarks.load("device_summary")
train_step = benchmarks.load("train_step")


def _plan(*flags: str) -> dict[str, int]:
  out = subprocess.run(["bash", str(SCRIPT), "--plan", *flags], capture_output=True, text=True,
                       check=True, timeout=30).stdout
  return {line.split()[0]: int(line.split()[1].rstrip("s")) for line in out.splitlines()}


def test_plan_fits_one_eight_minute_call():
  plan = _plan()
  total = plan.pop("total")
  assert list(plan) == ["env", "train_step_jax", "train_step_torch", "train_loop", "evaluation",
                        "pretrained", "summary"]  # in order of value; the table last
  assert sum(plan.values()) == total <= 450  # of the 480 s call, start-up included
  assert min(plan.values()) >= 10
  only = _plan("--only=evaluation,train_loop")
  assert list(only) == ["train_loop", "evaluation", "summary", "total"]
  assert "train_step_jax" in _plan("--smoke")


def test_backbones_are_opt_in_and_fit_a_call_of_their_own():
  """Issue 23's backbone steps: not in the default run; `--only=backbones` fits one call."""
  names = ["backbone_googlenet_jax", "backbone_googlenet_torch", "backbone_vit_s16_jax",
           "backbone_vit_s16_torch", "backbone_vit_b16_jax", "backbone_vit_b16_torch"]
  assert not set(names) & set(_plan())
  plan = _plan("--only=backbones")
  total = plan.pop("total")
  assert list(plan) == ["env"] + names + ["summary"]
  assert sum(plan.values()) == total <= 450 and min(plan.values()) >= 10
  assert list(_plan("--only=backbone_vit_s16_jax")) == ["backbone_vit_s16_jax", "summary",
                                                        "total"]
  env = dict(os.environ, BACKBONES="1")
  out = subprocess.run(["bash", str(SCRIPT), "--plan"], capture_output=True, text=True,
                       check=True, timeout=30, env=env).stdout
  assert [line.split()[0] for line in out.splitlines()][-8:-2] == names


def test_table_lists_the_backbones(tmp_path):
  gib = 2**30
  (tmp_path / "backbone_vit_s16_jax.json").write_text(json.dumps(dict(rows=[
      _step_row("jax", "jit", "bfloat16", 128, 3000.0, model="vit_small_patch16",
                peak_bytes_in_use=5 * gib)])))
  (tmp_path / "backbone_vit_s16_torch.json").write_text(json.dumps(dict(rows=[
      _step_row("torch", "eager", "bfloat16", 128, 2000.0, model="vit_small_patch16")])))
  result = summary.collect(tmp_path, 128, 512)
  (fig,) = [f for f in result["figures"] if f["figure"].startswith("vit_small_patch16")]
  assert fig["value"] == pytest.approx(1.5) and fig["target"] == "" and "3,000" in fig["text"]
  peaks = {m["what"]: m["peak"] for m in result["memory"]}
  assert peaks["vit_small_patch16 jax jit bfloat16 b128"] == 5 * gib
  assert "vit_small_patch16 JAX / torch eager, bfloat16 b128" in summary.format_table(result)


def test_unknown_argument_is_refused():
  proc = subprocess.run(["bash", str(SCRIPT), "--nope"], capture_output=True, text=True,
                        timeout=30)
  assert proc.returncode == 2 and "unknown argument" in proc.stderr


def _step_row(framework, mode, dtype, batch, ips, **extra):
  return dict(framework=framework, mode=mode, dtype=dtype, batch=batch, status="ok",
              images_per_s=ips, compile_s=30.0, **extra)


def _write_run(out: Path) -> None:
  """A run's files as the steps write them (values made up)."""
  gib = 2**30
  (out / "train_step_jax.json").write_text(json.dumps(dict(rows=[
      _step_row("jax", "jit", "bfloat16", 128, 4800.0, peak_bytes_in_use=14 * gib),
      _step_row("jax", "jit", "float32", 128, 2300.0, peak_bytes_in_use=26 * gib),
      dict(framework="jax", mode="jit", dtype="bfloat16", batch=512, status="stopped")])))
  (out / "train_step_torch.json").write_text(json.dumps(dict(rows=[
      _step_row("torch", "eager", "float32", 128, 1400.0, max_memory_allocated=20 * gib),
      _step_row("torch", "eager", "bfloat16", 128, 2700.0, max_memory_allocated=11 * gib),
      _step_row("torch", "compile", "bfloat16", 128, 3700.0, max_memory_allocated=9 * gib)])))
  (out / "train_loop.json").write_text(json.dumps(dict(rows=[
      dict(dtype="bfloat16", batch=128, step_images_per_s=4700.0, loop_images_per_s=4600.0,
           loop_over_step=4600 / 4700, compile_s=20.0, peak_bytes_in_use=15 * gib),
      dict(dtype="bfloat16", batch=512, step_images_per_s=5600.0, loop_images_per_s=5000.0,
           loop_over_step=5000 / 5600, compile_s=25.0, peak_bytes_in_use=50 * gib)])))
  (out / "evaluation.json").write_text(json.dumps(dict(results=[
      dict(case="self-60502x512", method="ours", first_s=3.0, steady_s=0.3, device_s=0.2,
           device_peak_mb=3000.0),
      dict(case="17954x1027871x256", method="ours", error="OOM")])))
  (out / "pretrained.json").write_text(json.dumps(dict(reference="torchvision 0.26.0", models=[
      dict(name="resnet50", rel_err_highest=5e-7, rel_err_default=2e-3)])))
  (out / "forbidden_imports.jsonl").write_text(
      json.dumps(dict(kind="probe", module="tensorflow", found=False, importer="etils:1")) + "\n")
  (out / "steps.tsv").write_text("env\t15\t15\t0\t4\ntrain_step_jax\t145\t156\t124\t157\n")


def test_table_gives_every_figure_its_verdict(tmp_path):
  _write_run(tmp_path)
  result = summary.collect(tmp_path, ratio_batch=128, big_batch=512)
  verdicts = {f["figure"]: (f["verdict"], f["value"]) for f in result["figures"]}
  assert verdicts["JAX / torch.compile, bf16 b128"] == ("PASS", pytest.approx(4800 / 3700))
  assert verdicts["JAX / torch eager, bf16 b128"][0] == "PASS"
  assert verdicts["JAX / torch eager, f32 b128"] == ("PASS", pytest.approx(2300 / 1400))
  # The step's own b512 row was cut by the limit: the loop's step alone stands in.
  assert verdicts["JAX step bf16 b512, images/s"] == ("PASS", 5600.0)
  assert verdicts["loop / step alone, bf16 b128"][0] == "PASS"
  assert verdicts["loop / step alone, bf16 b512"][0] == "FAIL"
  assert verdicts["evaluation self-retrieval 60,502 x 512, end to end"] == ("PASS", 0.3)
  assert verdicts["evaluation 17,954 x 1,027,871 x 256, end to end"] == ("missing", None)
  assert verdicts["torchvision 0.26.0 parity, resnet50"] == ("PASS", 5e-7)
  assert verdicts["tensorflow/tfds/clu imported"] == ("PASS", 0)  # a probe is no import
  peaks = {m["what"]: m["peak"] for m in result["memory"]}
  assert peaks["jax jit float32 b128"] == 26 * 2**30
  assert peaks["torch compile bfloat16 b128"] == 9 * 2**30
  assert peaks["loop bfloat16 b512"] == 50 * 2**30
  table = summary.format_table(result)
  assert "| JAX / torch.compile, bf16 b128" in table and "26.0 GiB" in table
  assert "train_step_jax 157/156s exit 124 TIME LIMIT" in table
  assert "none imported" in table


def test_table_of_an_empty_or_smoke_run(tmp_path):
  result = summary.collect(tmp_path, 128, 512)
  assert {f["verdict"] for f in result["figures"] if f["target"] not in ("", "none")} == {
      "missing"}
  _write_run(tmp_path)
  smoke = summary.collect(tmp_path, 128, 512, smoke=True)
  assert "FAIL" not in {f["verdict"] for f in smoke["figures"]}
  assert "--smoke" in summary.format_table(smoke)


def test_main_writes_summary_json(tmp_path, capsys):
  _write_run(tmp_path)
  assert summary.main(["table", f"--out={tmp_path}"]) == 0
  assert "| figure" in capsys.readouterr().out
  assert json.loads((tmp_path / "summary.json").read_text())["figures"]


def test_import_recorder_tells_probes_imports_and_loaded(tmp_path):
  fake = tmp_path / "site"
  (fake / "clu").mkdir(parents=True)
  (fake / "clu" / "__init__.py").write_text("")
  log = tmp_path / "imports.jsonl"
  code = textwrap.dedent("""
      import importlib.util
      importlib.util.find_spec("tensorflow")   # a probe
      import clu                               # an import (of the fake package)
      import json                              # not recorded
  """)
  env = dict(os.environ, PYTHONPATH=f"{HOOKS}{os.pathsep}{fake}",
             HN_FORBIDDEN_IMPORTS_LOG=str(log))
  subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
  records = [json.loads(line) for line in log.read_text().splitlines()]
  kinds = {(r["kind"], r["module"]) for r in records}
  assert kinds == {("probe", "tensorflow"), ("import", "clu"), ("loaded", "clu")}
  assert all(r["importer"].startswith(("<string>", "-")) for r in records)


@pytest.mark.slow
def test_benchmark_modules_import_no_tensorflow(tmp_path):
  """What device_check.sh runs, imported under the recorder: no import of TF, TFDS or CLU."""
  log = tmp_path / "imports.jsonl"
  code = textwrap.dedent("""
      import importlib.util, sys
      for name in ("device_summary", "train_step", "train_loop", "evaluation",
                   "pretrained_check"):
        spec = importlib.util.spec_from_file_location(name, f"benchmarks/{name}.py")
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
      from hn_jax import train_step, sharding, evaluation  # what the workers import
      from hn_jax.data import input_pipeline, in_memory, samplers, splits
      from configs import synthetic
      print(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "clu")))
  """)
  env = dict(os.environ, PYTHONPATH=str(HOOKS), HN_FORBIDDEN_IMPORTS_LOG=str(log),
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split("\n")[-2] == "[]"
  records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
  assert [r for r in records if r["kind"] != "probe"] == []


def test_configs_flag_keeps_its_order():
  args = train_step.parse_args(["--smoke", "--configs=jax:jit:bfloat16:16,torch:eager:float32:16,"
                                "jax:jit:float32:32"])
  plan = train_step.plan(args)
  assert list(plan) == ["jax", "torch"]
  assert [(c["dtype"], c["batch"]) for c in plan["jax"]] == [("bfloat16", 16), ("float32", 32)]
  assert plan["torch"] == [dict(framework="torch", mode="eager", dtype="float32", batch=16)]
  for bad in ("jax:eager:float32:16", "torch:jit:float32:16", "jax:jit:float16:16",
              "jax:jit:float32", "jax:jit:float32:x"):
    with pytest.raises(SystemExit):
      train_step.parse_args([f"--configs={bad}"])


@pytest.mark.slow
def test_a_stopped_train_step_run_keeps_its_finished_rows(tmp_path):
  """SIGTERM (as `timeout` sends) after the first row: that row is kept, the rest "stopped"."""
  out = tmp_path / "stopped.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                        + " --xla_backend_optimization_level=0").strip())
  proc = subprocess.Popen(
      [sys.executable, "benchmarks/train_step.py", "--smoke", "--steps=1", "--warmup=0",
       "--configs=jax:jit:float32:16,jax:jit:float32:32,jax:jit:bfloat16:48",
       f"--json={out}"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
      text=True, start_new_session=True)
  deadline = time.monotonic() + 240
  try:
    for line in proc.stdout:  # the worker prints a line per finished configuration
      if "] ok:" in line:
        break
      assert time.monotonic() < deadline, "no configuration finished"
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group, as `timeout` does
    rest, _ = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  assert proc.returncode == 128 + signal.SIGTERM, rest
  result = json.loads(out.read_text())
  assert result["stopped"] == "SIGTERM"
  statuses = [(r["batch"], r["status"]) for r in result["rows"]]
  assert statuses[0] == (16, "ok") and len(statuses) == 3
  assert {s for _, s in statuses[1:]} <= {"ok", "stopped"} and statuses[-1] == (48, "stopped")
