"""benchmarks/train_step.py (issue 8): its --smoke run, its torch loss and its torch ResNet.

The speed comparison is only worth something if the PyTorch side trains the same network
with the same loss: the loss written in torch in the script must equal hn_jax's, and its
torch ResNet must have hn_jax's (torchvision's) layout, key by key.
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
from flax import nnx

from hn_jax import losses, models, pretrained
from hn_jax.testing import benchmarks, torch_reference

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "train_step.py"


bench = benchmarks.load("train_step")


@pytest.mark.slow
def test_smoke_run_without_tensorflow(tmp_path):
  """The --smoke preset end to end in a subprocess, with tensorflow/tfds/clu made unimportable.

  torch.compile is left out (`--torch_modes=eager`): on 2 loaded CPU cores compiling even the
  tiny network takes minutes. XLA's backend optimization level 0 and one OpenMP thread for
  torch only make this smoke test quicker on a busy machine (the figures mean nothing here).
  """
  out = tmp_path / "tiny.json"
  env = benchmarks.quick_compile_env()
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), "--smoke", "--torch_modes=eager", "--check_no_tf",
       f"--json={out}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'check_no_tf: "tensorflow" in sys.modules: False' in proc.stdout
  assert "| framework |" in proc.stdout

  result = json.loads(out.read_text())
  assert {c["framework"] for c in result["check_no_tf"]} == {"jax", "torch"}
  assert all(c["loaded"] == [] for c in result["check_no_tf"])
  rows = {(r["framework"], r["mode"], r["dtype"]): r for r in result["rows"]}
  assert set(rows) == {("jax", "jit", "float32"), ("jax", "jit", "bfloat16"),
                       ("torch", "eager", "float32"), ("torch", "eager", "bfloat16")}
  for key, row in rows.items():
    assert row["batch"] == 16 and row["image_size"] == 32, key
    if key == ("torch", "eager", "bfloat16") and row["status"] == "error":
      continue  # bfloat16 autocast may be unsupported by a CPU build of torch
    assert row["status"] == "ok", (key, row.get("error"))
    assert row["images_per_s"] > 0 and row["step_ms"] > 0 and row["compile_s"] > 0, key
    assert np.isfinite(row["final_loss"]), key
  assert result["env"]["jax"]["jax"] == jax.__version__
  assert result["env"]["torch"]["torch"] == torch.__version__
  assert result["env"]["jax"]["mesh_devices"] == jax.device_count()
  ratio = {e["dtype"]: e for e in result["ratios"]}["float32"]
  assert ratio["jax_over_torch_eager"] > 0


@pytest.mark.slow
def test_a_failing_configuration_does_not_stop_the_run(tmp_path):
  """Batch 15 cannot be split over the 8 simulated devices: an error row, not a crash."""
  assert 15 % jax.device_count()
  out = tmp_path / "bad.json"
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), "--smoke", "--frameworks=jax", "--dtypes=float32",
       "--batch_sizes=15", f"--json={out}"], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (row,) = json.loads(out.read_text())["rows"]
  assert row["status"] == "error" and "divisible" in row["error"]
  assert "| jax       | jit  | float32 | 15    | error" in proc.stdout


def _embeddings(seed=0, n=40, dim=16):
  """Two images per class around noisy class centres, plus a duplicate and a singleton."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n) // 2
  labels[-1] = n  # a class of one: its anchor has no positive (invalid)
  centres = rng.standard_normal((n + 1, dim))
  f = centres[labels] + 0.9 * rng.standard_normal((n, dim))
  f[3] = f[2]  # identical pair: similarity 1 > 0.9999, not a positive
  return f.astype(np.float32), labels.astype(np.int32)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sct", "hn", "shn"])
def test_torch_loss_equals_hn_jax(method):
  f, y = _embeddings()
  jax_loss_fn = lambda e: losses.triplet_loss(e, jnp.asarray(y), method=method)
  (loss, aux), grad = jax.value_and_grad(jax_loss_fn, has_aux=True)(jnp.asarray(f))
  assert float(aux["num_valid"]) < len(y)
  if method == "sct":
    assert float(aux["num_hard"]) > 0 and float(aux["num_easy"]) > 0, aux

  ft = torch.tensor(f, requires_grad=True)
  loss_t, aux_t = torch_reference.triplet_loss_torch(ft, torch.tensor(y), method=method, with_aux=True)
  loss_t.backward()
  np.testing.assert_allclose(loss_t.item(), float(loss), rtol=1e-5)
  np.testing.assert_allclose(ft.grad.numpy(), np.asarray(grad), rtol=1e-4,
                             atol=1e-6 * float(np.abs(grad).max()))
  for key, value in aux.items():
    np.testing.assert_allclose(aux_t[key].item(), float(value), rtol=1e-5, atol=1e-7,
                               err_msg=key)
  # What the benchmark's step calls: the loss alone, same value.
  np.testing.assert_allclose(
      torch_reference.triplet_loss_torch(torch.tensor(f), torch.tensor(y), method=method).item(),
      float(loss), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["small", "resnet50"])
def test_torch_resnet_has_hn_jax_layout(name):
  """Every key and shape of the script's torch ResNet maps onto hn_jax's model."""
  model, impl = torch_reference.build_torch_resnet(name, 512, impl="script")
  assert "this file" in impl
  abstract = nnx.eval_shape(lambda: models.create_model(name, 512, rngs=nnx.Rngs(0)))
  _, params, batch_stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
  state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
  pretrained.check_torchvision_state_dict(state_dict, params, batch_stats)
  torch_count = sum(p.numel() for p in model.parameters())
  jax_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert torch_count == jax_count
  if name == "resnet50":
    assert torch_count == 24_557_120  # torchvision resnet50 with fc 2048 -> 512


def test_flags_and_smoke_preset():
  args = bench.parse_args(["--smoke", "--steps=3", "--torch_modes=eager"])
  assert args.batch_sizes == [16] and args.image_size == 32 and args.steps == 3
  assert args.jax_model == "small" and args.torch_model == "small"
  assert args.torch_modes == ["eager"] and args.dtypes == ["float32", "bfloat16"]
  args = bench.parse_args([])
  assert args.batch_sizes == [128, 512] and args.image_size == 256 and args.steps == 20
  assert args.warmup == 5 and args.frameworks == ["jax", "torch"]
  assert args.torch_modes == ["eager", "compile"] and args.jax_model == "resnet50"
  with pytest.raises(SystemExit):
    bench.parse_args(["--dtypes=float16"])


def test_table_ratios_and_targets():
  ok = lambda fw, mode, dtype, batch, ips: dict(
      framework=fw, mode=mode, dtype=dtype, batch=batch, status="ok", images_per_s=ips,
      step_ms=1e3 * batch / ips, compile_s=1.0)
  rows = [ok("jax", "jit", "bfloat16", 512, 6000.0), ok("torch", "eager", "bfloat16", 512, 3000.0),
          dict(framework="torch", mode="compile", dtype="bfloat16", batch=512, status="OOM")]
  ratio_rows = bench.ratios(rows)
  assert ratio_rows == [dict(dtype="bfloat16", batch=512, jax_over_torch_eager=2.0,
                             jax_over_torch_compile=None)]
  verdicts = {t["target"]: t["passed"] for t in bench.targets(rows, ratio_rows)}
  assert verdicts == {"jax/torch-eager images/s >= 1.5": True,
                      "jax/torch-compile images/s >= 1.2": None,
                      "jax images/s >= 5500": True}
  table = bench.format_table(rows, ratio_rows)
  assert "OOM" in table and "2.00" in table


# ---------------------------------------------------------------------------------------------
# The backbones of issue 23: googlenet and the ViTs, torch side from the references here.

BACKBONES = ("googlenet", "googlenet_mini", "vit_small_patch16", "vit_base_patch16", "vit_mini")


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKBONES)
def test_torch_backbone_has_hn_jax_layout(name):
  """The script's torch googlenet / ViT (the references): hn_jax's keys, shapes and size."""
  size = 32 if name in ("googlenet_mini", "vit_mini") else 224
  model, impl = bench.build_torch_model(name, 512, "script", size)
  assert "hn_jax.testing.torch_reference" in impl
  abstract = nnx.eval_shape(lambda: models.create_model(name, 512, rngs=nnx.Rngs(0),
                                                        image_size=size))
  _, params, batch_stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
  state_dict = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  pretrained.check_torchvision_state_dict(state_dict, params, batch_stats)
  torch_count = sum(p.numel() for p in model.parameters())
  assert torch_count == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  if name in bench.VIT_SPECS:
    assert bench.VIT_SPECS[name] == models.VIT_SPECS[name]


def test_backbone_flags():
  args = bench.parse_args(["--jax_model=googlenet", "--image_size=128"])
  assert args.torch_model == "googlenet" and args.image_size == 128
  args = bench.parse_args(["--smoke", "--jax_model=vit_mini"])
  assert args.jax_model == args.torch_model == "vit_mini"
  assert bench.parse_args(["--jax_model=vit_small_patch16",
                           "--torch_model=vit_base_patch16"]).torch_model == "vit_base_patch16"
  with pytest.raises(ValueError, match="not from timm"):
    bench.build_torch_model("googlenet", 512, "timm")
  with pytest.raises(ValueError, match="no library version"):
    bench.build_torch_model("vit_mini", 512, "library")
  with pytest.raises(SystemExit):
    bench.parse_args(["--jax_model=vit_huge"])


def _tiny_args(model: str) -> dict:
  args = vars(bench.parse_args(["--smoke", f"--jax_model={model}", "--steps=1", "--warmup=0"]))
  return dict(args, torch_impl="script")


@pytest.mark.slow
def test_torch_googlenet_and_vit_steps_run_tiny():
  """The torch worker's step, in this process, on googlenet_mini (32 px; vit_mini: the
  end-to-end run below)."""
  for model in ("googlenet_mini",):
    records = []
    spec = dict(args=_tiny_args(model),
                configs=[dict(framework="torch", mode="eager", dtype="float32", batch=8)])
    bench._torch_worker(spec, records.append)  # pylint: disable=protected-access
    env, row = records
    assert env["kind"] == "env" and "hn_jax.testing.torch_reference" in env["model_impl"]
    assert row["status"] == "ok", row.get("error")
    assert row["model"] == model and row["model_impl"] == env["model_impl"]
    assert row["images_per_s"] > 0 and np.isfinite(row["final_loss"])


@pytest.mark.slow
def test_jax_and_torch_vit_steps_run_end_to_end(tmp_path):
  """The script on vit_mini (both frameworks, float32, one timed step): rows and which model."""
  out = tmp_path / "vit.json"
  env = benchmarks.quick_compile_env()
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), "--smoke", "--jax_model=vit_mini", "--dtypes=float32",
       "--torch_modes=eager", "--steps=1", "--warmup=0", f"--json={out}"], cwd=REPO, env=env,
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads(out.read_text())
  rows = {r["framework"]: r for r in result["rows"]}
  assert set(rows) == {"jax", "torch"}
  for row in rows.values():
    assert row["status"] == "ok", row.get("error")
    assert row["model"] == "vit_mini" and row["image_size"] == 32
    assert np.isfinite(row["final_loss"])
  assert rows["jax"]["model_impl"] == "hn_jax.models vit_mini"
  assert "build_torch_vit" in rows["torch"]["model_impl"]
  assert result["targets"] == []  # the issue-8 targets are for ResNet50 only
