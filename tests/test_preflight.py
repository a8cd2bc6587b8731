"""hn_jax.preflight: real compiles for a TPU slice and an NVIDIA GPU host, with neither attached.

libtpu and the CUDA plugin are in requirements-test.txt, so these run (not skip) in CI. The model is
`small` at 16 px: each compile takes seconds.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from hn_jax import accelerators, losses, platforms, preflight
from hn_jax.testing import benchmarks

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config=configs/digits.py", "--config.image_size=16", "--config.batch_size=16",
        "--config.eval_batch_size=64"]


def tiny_config(**overrides):
  """TINY's config: configs/digits.py at 16 px (the command tests compile the same programs)."""
  config = digits.get_config()
  config.update(image_size=16, batch_size=16, eval_batch_size=64)
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
  """One folder of compiled programs' figures for the module: each program compiles once."""
  return str(tmp_path_factory.mktemp("figures"))


def run_command(*args, env=None):
  environment = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  environment.update(env or {})
  return subprocess.run([sys.executable, "-m", "hn_jax.preflight", *args], cwd=REPO,
                        env=environment, capture_output=True, text=True, timeout=600)


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize("name, kind, chips, libtpu", [
    ("v5e:2x2", "v5e", 4, "v5e:2x2"), ("v5litepod-16", "v5e", 16, "v5e:4x4"),
    ("v4-8", "v4", 4, "v4:2x2x1"), ("v4-32", "v4", 16, "v4:2x2x4"),
    ("v5p:2x2x4", "v5p", 16, "v5p:2x2x4"), ("v6e-4", "v6e", 4, "v6e:2x2")])
def test_tpu_names(name, kind, chips, libtpu):
  topology = accelerators.parse_topology(name)
  assert (topology.chip.kind, topology.chips, topology.libtpu_name) == (kind, chips, libtpu)


@pytest.mark.parametrize("name, kind, chips, hosts", [
    ("h100:8", "h100", 8, 1), ("h100:2x8", "h100", 16, 2), ("H200:1", "h200", 1, 1)])
def test_gpu_names(name, kind, chips, hosts):
  topology = accelerators.parse_topology(name)
  assert (topology.chip.kind, topology.chips, topology.hosts) == (kind, chips, hosts)


@pytest.mark.parametrize("name", ["v5e", "v5e:2x2x2", "v4:2x2", "v4-7", "h100:9", "a100:8", ""])
def test_unknown_names_say_which_work(name):
  with pytest.raises(accelerators.TopologyError, match="--topology="):
    accelerators.parse_topology(name)


def test_gpu_usable_memory_follows_jax_preallocation(monkeypatch):
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  chip = accelerators.parse_topology("h200:1").chip
  assert chip.usable_memory_bytes == int(chip.memory_bytes * 0.75)
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
  chip = accelerators.parse_topology("h200:1").chip
  assert chip.usable_memory_bytes == int(chip.memory_bytes * 0.9)


# ----------------------------------------------------------------------------- pure parts


def test_collectives_are_read_from_compiled_text():
  text = "\n".join([
      "  %all-reduce.1 = bf16[1024,512]{1,0} all-reduce(bf16[1024,512]{1,0} %p), to_apply=%add",
      "  %ar = (f32[64]{0}, f32[128]{0}) all-reduce-start(f32[64]{0} %a, f32[128]{0} %b)",
      "  %ag = (f32[8,32]{1,0}, f32[64,32]{1,0}) all-gather-start(f32[8,32]{1,0} %e)",
      "  %ag.2 = f32[64,32]{1,0} all-gather(f32[8,32]{1,0} %e2), dimensions={0}",
      "  %done = f32[64,32]{1,0} all-gather-done(%ag)",
      "  %add = f32[64]{0} add(f32[64]{0} %x, f32[64]{0} %y)"])
  found = {(c["op"], c["dtype"]): (c["count"], c["bytes"]) for c in preflight._collectives(text)}
  assert found == {("all-reduce", "bf16"): (1, 1024 * 512 * 2),
                   ("all-reduce", "f32"): (2, (64 + 128) * 4),
                   ("all-gather", "f32"): (2, 2 * 64 * 32 * 4)}


@pytest.mark.parametrize("m, chips, hosts, step", [(2, 4, 1, 1), (4, 8, 1, 1), (4, 2, 1, 2),
                                                   (2, 16, 4, 1), (3, 4, 2, 3), (4, 6, 2, 4)])
def test_batch_step_keeps_every_share_whole(m, chips, hosts, step):
  assert preflight.batch_step(m, chips, hosts) == step
  for s in range(1, step):
    assert (s * chips) % m or ((s * chips) // hosts) % m


class _LineOfMemory:
  """A stand-in compiler: peak = fixed + per_image * b + quadratic * b^2 (the global mining
  matrix); over the chip's memory it refuses, as the TPU compiler does."""

  def __init__(self, fixed, per_image, quadratic, usable):
    self.fixed, self.per_image, self.quadratic, self.usable = fixed, per_image, quadratic, usable
    self.compiled = []

  def peak(self, b):
    return int(self.fixed + self.per_image * b + self.quadratic * b * b)

  def compile(self, name, lowered, batch, chip, flops=None, cache_dir=None):
    self.compiled.append(batch)
    program = preflight.Program(name, batch, peak_bytes=self.peak(batch))
    program.fits = program.peak_bytes <= self.usable
    if not program.fits:
      program.peak_bytes, program.refused = 0, "RESOURCE_EXHAUSTED: exceeds available HBM"
    return program


class _Batches:
  def train(self, batch):
    return batch


@pytest.mark.parametrize("seed", range(12))
def test_largest_batch_matches_brute_force(monkeypatch, seed):
  rng = np.random.default_rng(seed)
  usable = 16 * 2**30
  line = _LineOfMemory(fixed=rng.uniform(0.05, 4) * 2**30, per_image=rng.uniform(2, 200) * 2**20,
                       quadratic=rng.choice([0.0, rng.uniform(0, 2000)]), usable=usable)
  monkeypatch.setattr(preflight, "compile_program", line.compile)
  step = int(rng.choice([1, 2, 4, 8]))
  first_batch = int(rng.choice([1, 4, 16, 64, 512])) * step
  chip = accelerators.parse_topology("v5e:2x2").chip
  chip = accelerators.Chip(**{**chip.__dict__, "usable_memory_bytes": usable})
  first = line.compile("train", None, first_batch, chip)
  line.compiled.clear()
  result = preflight.largest_batch(_Batches(), chip, first, step, ceiling=2**20)
  truth = max((b for b in range(step, 2**16, step) if line.peak(b) <= usable), default=0)
  assert result["batch_per_chip"] == truth and not result["at_least"]
  assert result["compiles"] == len(line.compiled) <= 10


def test_largest_batch_stops_at_the_ceiling(monkeypatch):
  line = _LineOfMemory(fixed=2**20, per_image=2**10, quadratic=0, usable=16 * 2**30)
  monkeypatch.setattr(preflight, "compile_program", line.compile)
  chip = accelerators.parse_topology("v5e:2x2").chip
  first = line.compile("train", None, 8, chip)
  result = preflight.largest_batch(_Batches(), chip, first, 2, ceiling=128)
  assert result == {**result, "batch_per_chip": 128, "at_least": True}
  assert max(line.compiled) == 128


def test_roofline_is_the_smaller_bound():
  chip = accelerators.parse_topology("v5e:2x2").chip
  program = preflight.Program("train", 32, flops_per_chip=32 * 1e10,
                              bytes_accessed_per_chip=32 * 1e8, xla_optimal_seconds=1.0)
  bound = preflight.roofline(program, chip, half_precision=True)
  assert bound["compute_bound"] == pytest.approx(197e12 / 1e10)
  assert bound["memory_bound"] == pytest.approx(819e9 / 1e8)
  assert bound["images_per_second"] == min(bound["compute_bound"], bound["memory_bound"])
  assert bound["bound_by"] == "memory" and bound["xla_estimate"] == pytest.approx(32.0)
  program.xla_optimal_seconds = 1e-9  # faster than the roofline allows: not sane, not shown
  assert "xla_estimate" not in preflight.roofline(program, chip, half_precision=True)


def test_mining_similarities_are_float32_on_every_backend():
  text = jax.jit(losses.cosine_similarities).lower(jnp.ones((8, 4), jnp.bfloat16)).as_text()
  dots = [line for line in text.splitlines() if "dot_general" in line]
  assert dots and all("HIGHEST" in line for line in dots), dots


# ----------------------------------------------------------------------------- real compiles


@pytest.fixture(scope="module")
def tpu_report(figures):
  return preflight.run_preflight(tiny_config(), "v5e:2x2", search_batch=False, say=lambda _: 0,
                                 cache_dir=figures)


def test_tpu_slice_compiles_and_fits(tpu_report):
  report = tpu_report
  assert report["fits"] and report["misfits"] == []
  assert (report["chip"], report["chips"], report["hosts"]) == ("v5e", 4, 1)
  programs = {p["name"]: p for p in report["programs"]}
  assert set(programs) == {"train", "embed", "recall", "map_at_r"}
  train = programs["train"]
  assert train["batch_per_chip"] == 4 and programs["embed"]["batch_per_chip"] == 16
  assert 0 < train["argument_bytes"] <= train["peak_bytes"] < 2**30
  assert train["flops_per_image"] > 0 and train["roofline"]["images_per_second"] > 0
  # Global mining: every chip gathers the whole batch's (16, 32) float32 embeddings.
  gathers = [c for c in train["collectives"] if c["op"] == "all-gather" and c["dtype"] == "f32"]
  assert gathers and sum(c["bytes"] for c in gathers) >= 16 * 32 * 4
  assert any(c["op"] == "all-reduce" for c in train["collectives"])  # the gradients
  table = preflight.format_report(report)
  assert "train" in table and "GFLOP per image" in table and "all-gather f32" in table


def test_tpu_slice_too_small_for_the_program_does_not_fit(monkeypatch, tpu_report, figures):
  chips = accelerators._chips()
  tiny = accelerators.Chip(**{**chips["v5e"].__dict__, "usable_memory_bytes": 2**20})
  monkeypatch.setattr(accelerators, "_chips", lambda: {**chips, "v5e": tiny})
  report = preflight.run_preflight(tiny_config(), "v5e:2x2", search_batch=False,
                                   evaluation=False, say=lambda _: 0, cache_dir=figures)
  (train,) = report["programs"]
  assert train["peak_bytes"] > 2**20 and not train["fits"] and not report["fits"]
  (line,) = report["misfits"]
  assert line.startswith("the train program at 4 per chip needs") and "1.0 MiB (" in line


class _Refused:
  def compile(self):
    raise RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory "
                       "in memory space hbm. Used 24.26G of 15.75G hbm. Exceeded hbm capacity "
                       "by 8.51G.")


def test_a_compiler_refusal_is_a_no_fit_and_other_errors_are_not():
  chip = accelerators.parse_topology("v5e:2x2").chip
  program = preflight.compile_program("train", _Refused(), 1024, chip)
  assert not program.fits and "Exceeded hbm capacity by 8.51G" in program.refused
  assert "refused by the compiler" in preflight.format_report({
      "usable_memory_bytes": chip.usable_memory_bytes,
      "programs": [preflight.dataclasses.asdict(program)]})

  class Broken:
    def compile(self):
      raise RuntimeError("INTERNAL: something else")

  with pytest.raises(RuntimeError, match="something else"):
    preflight.compile_program("train", Broken(), 8, chip)


@pytest.mark.slow
def test_gpu_host_fits_and_without_the_memory_does_not(monkeypatch, figures):
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")
  report = preflight.run_preflight(tiny_config(), "h200:2", search_batch=False,
                                   evaluation=False, say=lambda _: 0, cache_dir=figures)
  (train,) = report["programs"]
  assert report["fits"] and train["fits"] and train["flops_per_image"] > 0
  assert 0 < train["argument_bytes"] <= train["peak_bytes"] < 2**30
  assert any(c["op"] == "all-reduce" for c in train["collectives"])
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.00001")  # ~1.4 MiB of 141 GB
  report = preflight.run_preflight(tiny_config(), "h200:2", search_batch=False,
                                   evaluation=False, say=lambda _: 0, cache_dir=figures)
  (train,) = report["programs"]
  assert train["peak_bytes"] > report["usable_memory_bytes"] and not report["fits"]
  (line,) = report["misfits"]
  assert line.startswith("the train program at 8 per chip needs") and "over)" in line
  assert " NO" in preflight.format_report(report)


def test_command_that_fits_exits_0_and_writes_json(tmp_path, tpu_report, figures):
  out = tmp_path / "report.json"
  result = run_command(*TINY, "--topology=v5e:2x2", "--search_batch=false",
                       f"--cache_dir={figures}", f"--json={out}")
  assert result.returncode == 0, result.stderr
  assert "train" in result.stdout and "recall" in result.stdout
  report = json.loads(out.read_text())
  assert report["fits"] and report["topology"] == "v5e:2x2" and report["chips"] == 4
  assert report["programs"] == tpu_report["programs"]  # the module's compiles, read back
  assert "Could not find cuda" not in result.stderr and "libtpu" not in result.stderr
  assert result.stderr.count("\n") == 1  # the one line saying what is compiled for what


def test_command_that_does_not_fit_exits_1_with_one_line(monkeypatch, capsys):
  report = {"fits": False, "misfits": ["the train program at 8 per chip needs 2 GiB of 1 GiB"],
            "programs": [], "usable_memory_bytes": 2**30}
  monkeypatch.setattr(preflight, "run_preflight", lambda *a, **k: report)
  assert preflight.main([*TINY, "--topology=h200:2"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1] == ("hn_jax.preflight: does not fit on h200:2: the train program at 8 per "
                     "chip needs 2 GiB of 1 GiB")


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--topology=v5e:2x2", "--config.batch_size=6"], "not divisible by the 4 devices"),
    (["--topology=v5e:3x3"], "libtpu refuses v5e:3x3"),
    (["--topology=tpu7"], "not a known target"),
    (["--topology=h100:8", "--config.loss=nope"], "config.loss='nope' is not a loss"),
])
def test_command_refuses_what_cannot_run_there_before_compiling(args, message):
  result = run_command(*TINY, *args)
  assert result.returncode == 2, result.stderr
  assert result.stdout == "" and message in result.stderr
  assert len(result.stderr.strip().splitlines()) <= 2, result.stderr  # header + the one line
  assert "compiling" not in result.stderr


@pytest.mark.slow
def test_cpu_only_processes_keep_the_accelerator_plugins_unloaded():
  if platforms.accelerator_visible():
    pytest.skip("this machine has an accelerator: JAX chooses its platforms itself")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  code = "import hn_jax, jax, os; jax.devices(); print(os.environ['JAX_PLATFORMS'], jax.default_backend())"
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
  assert result.stdout.split() == ["cpu", "cpu"] and result.stderr == "", result.stderr


@pytest.mark.slow
def test_the_state_is_built_as_shapes_without_weights_or_tensorflow(tmp_path):
  code = (
      "import sys, hn_jax, jax\n"
      "from hn_jax import run_config, train_step\n"
      "c = run_config.defaults(); c.model = 'resnet18'; c.pretrained = sys.argv[1]\n"
      "graphdef, state, tx = train_step.abstract_state(c)\n"
      "leaves = jax.tree.leaves(state)\n"
      "print(all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves), len(leaves),\n"
      "      sum(x.size for x in jax.tree.leaves(state.params)),\n"
      "      'tensorflow' in sys.modules, 'clu' in sys.modules)\n")
  # A weights file that does not exist: the shapes do not need it.
  result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "missing.pth")],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  shapes_only, leaves, params, tf, clu = result.stdout.split()
  assert shapes_only == "True" and int(leaves) > 100  # weights, statistics, momenta
  assert 11_100_000 < int(params) < 11_300_000  # ResNet18's backbone and a 64-d head
  assert (tf, clu) == ("False", "False")


def test_figures_of_a_program_compiled_before_are_read_back(tmp_path, monkeypatch):
  chip = accelerators.parse_topology("v5e:2x2").chip
  lowered = jax.jit(lambda x: x * 2).lower(jax.ShapeDtypeStruct((8,), jnp.float32))
  first = preflight.compile_program("train", lowered, 4, chip, cache_dir=str(tmp_path))
  monkeypatch.setattr(preflight, "_compile", lambda *a: pytest.fail("compiled again"))
  again = preflight.compile_program("embed", lowered, 2, chip, cache_dir=str(tmp_path))
  assert (again.name, again.batch_per_chip) == ("embed", 2)
  assert again.peak_bytes == first.peak_bytes and again.fits
  tiny = accelerators.Chip(**{**chip.__dict__, "usable_memory_bytes": 1})
  assert not preflight.compile_program("train", lowered, 4, tiny, cache_dir=str(tmp_path)).fits
  other = accelerators.parse_topology("h100:1").chip  # another chip: compiled anew
  with pytest.raises(pytest.fail.Exception, match="compiled again"):
    preflight.compile_program("train", lowered, 4, other, cache_dir=str(tmp_path))


def test_benchmark_scripts_smoke(tmp_path, capsys, tpu_report, figures):
  """benchmarks/preflight_table.py and benchmarks/mining_precision.py at --smoke."""
  mining_precision = benchmarks.load("mining_precision")
  preflight_table = benchmarks.load("preflight_table")
  args = ["--smoke", f"--out={tmp_path}", f"--cache_dir={figures}"]
  assert preflight_table.main(args) == 0  # "--smoke" runs (the module's train step, read back)
  table = capsys.readouterr().out
  assert "| digits | v5e:2x2 | 4 | 4 | yes |" in table, table
  assert preflight_table.main(args) == 0  # its report read back
  assert capsys.readouterr().out == table
  # --smoke alone: the same table from a temporary folder of reports.
  assert preflight_table.main(["--smoke", f"--cache_dir={figures}"]) == 0
  assert capsys.readouterr().out == table
  assert mining_precision.main(["--smoke"]) == 0
  out = capsys.readouterr().out
  assert "| 64 | 32 | highest / default |" in out, out


def test_a_gpu_gemm_xla_cannot_tile_is_compiled_with_cublas():
  real = jax.jit(lambda x: x @ x).lower(jax.ShapeDtypeStruct((8, 8), jnp.float32)).compile()

  class Untileable:
    options = []

    def compile(self, compiler_options=None):
      self.options.append(compiler_options)
      if compiler_options is None:
        raise RuntimeError("INTERNAL: Couldn't find output tile sizes that satisfy hlo: %dot")
      return real

  chip = accelerators.parse_topology("h100:1").chip
  lowered = Untileable()
  program = preflight.compile_program("train", lowered, 8, chip)
  assert lowered.options == [None, {"xla_gpu_enable_triton_gemm": False}]
  assert program.fits and program.peak_bytes > 0 and "cuBLAS" in program.note
  with pytest.raises(RuntimeError, match="tile sizes"):  # not on a TPU: its compiler has none
    preflight.compile_program("train", Untileable(), 8, accelerators.parse_topology("v5e:2x2").chip)
