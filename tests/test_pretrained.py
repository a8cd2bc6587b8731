"""Tests for loading torchvision ResNet weights (hn_jax.pretrained, hn_jax.tools.convert_weights).

The reference networks are plain PyTorch with torchvision's module layout and state-dict keys
(hn_jax.testing.torch_reference's; no torchvision needed). Tests that need PyTorch skip without it; the rest
(key checking, file handling) run anywhere.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hn_jax import pretrained
from hn_jax.tools import convert_weights
from hn_jax.models import create_model
from hn_jax.testing import torch_reference

EMBEDDING_DIM = 16
IMAGE_SIZE = 64
BATCH = 4
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Number of entries in torchvision's resnet18 / resnet50 state dicts.
TORCHVISION_NUM_KEYS = {"resnet18": 122, "resnet50": 320}


# ---------------------------------------------------------------------------------------------
# Plain-PyTorch ResNets with torchvision's layout: hn_jax.testing.torch_reference's (its layout
# is checked against hn_jax's in tests/test_benchmark_train_step.py).


def _torch_resnet(name: str):
  pytest.importorskip("torch")
  model, _ = torch_reference.build_torch_resnet(name, 1000, impl="script")  # fc as torchvision's
  return model


def _randomize_batchnorm(model, generator) -> None:
  """Non-trivial affine parameters and running statistics in every BatchNorm."""
  torch = pytest.importorskip("torch")
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(torch.rand(c, generator=generator) + 0.5)  # U(0.5, 1.5)
        m.bias.copy_(0.1 * torch.randn(c, generator=generator))
        m.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
        m.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)  # U(0.5, 2)
        m.num_batches_tracked.fill_(int(torch.randint(1, 10_000, (), generator=generator)))


@pytest.fixture(scope="module")
def make_checkpoint(tmp_path_factory):
  """name -> (name, torch model in eval mode, path of its saved state dict); cached."""
  cache = {}

  def make(name):
    if name not in cache:
      torch = pytest.importorskip("torch")
      torch.manual_seed(0)
      model = _torch_resnet(name)
      _randomize_batchnorm(model, torch.Generator().manual_seed(1))
      model.eval()
      path = tmp_path_factory.mktemp(name) / f"{name}.pth"
      torch.save(model.state_dict(), path)
      cache[name] = (name, model, path)
    return cache[name]

  return make


@pytest.fixture(params=["resnet18", "resnet50"])
def torch_checkpoint(request, make_checkpoint):
  return make_checkpoint(request.param)


def _head(model) -> dict:
  return {k: np.asarray(v[...]) for k, v in
          [("kernel", model.embedding.kernel), ("bias", model.embedding.bias)]}


def _flat_arrays(model) -> dict:
  out = {}
  for kind in (nnx.Param, nnx.BatchStat):
    for path, var in nnx.to_flat_state(nnx.state(model, kind)):
      out[(kind.__name__,) + path] = np.asarray(var[...])
  return out


@nnx.jit
def _features(model, images):
  return model.features(images)


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


# ---------------------------------------------------------------------------------------------
# Numerical equivalence with PyTorch.


@pytest.mark.slow
def test_backbone_matches_torch(torch_checkpoint):
  torch = pytest.importorskip("torch")
  name, torch_model, path = torch_checkpoint
  assert len(torch_model.state_dict()) == TORCHVISION_NUM_KEYS[name]

  model = create_model(name, EMBEDDING_DIM, rngs=nnx.Rngs(7))
  head_before = _head(model)
  pretrained.load_torchvision_weights(model, path)
  model.eval()

  # The head keeps exactly its initialisation (same seed -> same values as a fresh model).
  head_after = _head(model)
  fresh = _head(create_model(name, EMBEDDING_DIM, rngs=nnx.Rngs(7)))
  for k in head_before:
    np.testing.assert_array_equal(head_after[k], head_before[k])
    np.testing.assert_array_equal(head_after[k], fresh[k])
  for path_, value in _flat_arrays(model).items():
    assert value.dtype == np.float32, path_

  images = np.random.default_rng(0).standard_normal(
      (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  with torch.no_grad():
    want = torch_model.features(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  got = np.asarray(_features(model, jnp.asarray(images)))  # jitted: faster than eager on CPU
  assert got.shape == want.shape == (BATCH, model.feature_dim)
  assert np.std(want) > 1e-3 and np.mean(want > 0) > 0.2  # not a degenerate comparison
  err = _rel_err(got, want)
  max_err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
  print(f"\n{name}: backbone relative error (norm) {err:.3e}, max-abs/max {max_err:.3e}, "
        f"device {jax.devices()[0].platform}")
  # Class (a), float32 JAX vs float32 PyTorch through a whole ResNet (other conv algorithms):
  # norm-wise error grows ~ sqrt(depth x fan-in) 2^-24, ~1e-6; 1e-4 leaves room for the
  # device check's GPUs (TF32 off). Not re-measured under other ISAs in the tolerance audit.
  assert err <= 1e-4


@pytest.mark.slow
def test_pth_values_land_in_the_right_place(torch_checkpoint):
  """Spot-checks the layout conversion key by key (OIHW -> HWIO, BN names, downsample)."""
  pytest.importorskip("torch")
  name, torch_model, path = torch_checkpoint
  sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  model = create_model(name, EMBEDDING_DIM, rngs=nnx.Rngs(0))
  pretrained.load_torchvision_weights(model, path)
  np.testing.assert_array_equal(model.conv1.kernel[...], sd["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(model.bn1.scale[...], sd["bn1.weight"])
  np.testing.assert_array_equal(model.bn1.mean[...], sd["bn1.running_mean"])
  np.testing.assert_array_equal(model.bn1.var[...], sd["bn1.running_var"])
  ds = model.layer2[0].downsample
  np.testing.assert_array_equal(ds.conv.kernel[...],
                                sd["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(ds.bn.bias[...], sd["layer2.0.downsample.1.bias"])
  np.testing.assert_array_equal(model.layer4[1].bn2.var[...], sd["layer4.1.bn2.running_var"])


# ---------------------------------------------------------------------------------------------
# Converted formats.


@pytest.mark.slow
def test_npz_and_safetensors_roundtrip(make_checkpoint, tmp_path, capsys):
  pytest.importorskip("safetensors")
  name, _, path = make_checkpoint("resnet18")  # one architecture is enough for the formats
  reference = create_model(name, EMBEDDING_DIM, rngs=nnx.Rngs(3))
  pretrained.load_torchvision_weights(reference, path)
  want = _flat_arrays(reference)
  for ext in (".npz", ".safetensors"):
    out = tmp_path / f"{name}{ext}"
    assert convert_weights.main([f"--input={path}", f"--output={out}", f"--model={name}"]) == 0
    assert "wrote 122 arrays" in capsys.readouterr().out
    model = create_model(name, EMBEDDING_DIM, rngs=nnx.Rngs(3))
    pretrained.load_torchvision_weights(model, out)
    got = _flat_arrays(model)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{ext} {k}")
    # Converted files hold the torchvision keys verbatim, readable without torch.
    assert len(pretrained.read_state_dict(out)) == TORCHVISION_NUM_KEYS[name]


# ---------------------------------------------------------------------------------------------
# Key checking and file handling (no PyTorch needed).


@pytest.fixture(scope="module")
def resnet18_state():
  """(params, batch_stats, a matching torchvision-style numpy state dict) for ResNet18."""
  abstract = nnx.eval_shape(lambda: create_model("resnet18", EMBEDDING_DIM, rngs=nnx.Rngs(0)))
  params, batch_stats = nnx.state(abstract, nnx.Param), nnx.state(abstract, nnx.BatchStat)
  rng = np.random.default_rng(0)
  sd = {k: rng.standard_normal(s).astype(np.float32)
        for k, s in pretrained.expected_torchvision_shapes(params, batch_stats).items()}
  for k in [k for k in sd if k.endswith("running_var")]:
    sd[k] = np.abs(sd[k]) + 0.5
    sd[k.replace("running_var", "num_batches_tracked")] = np.array(10, np.int64)
  sd["fc.weight"] = rng.standard_normal((1000, 512)).astype(np.float32)
  sd["fc.bias"] = rng.standard_normal((1000,)).astype(np.float32)
  assert len(sd) == TORCHVISION_NUM_KEYS["resnet18"]
  return params, batch_stats, sd


def test_torchvision_key_mapping():
  assert pretrained.torchvision_key(("conv1", "kernel")) == "conv1.weight"
  assert pretrained.torchvision_key(("bn1", "scale")) == "bn1.weight"
  assert pretrained.torchvision_key(("layer3", 1, "bn2", "mean")) == "layer3.1.bn2.running_mean"
  assert pretrained.torchvision_key(("layer1", 0, "bn3", "var")) == "layer1.0.bn3.running_var"
  assert (pretrained.torchvision_key(("layer2", 0, "downsample", "conv", "kernel"))
          == "layer2.0.downsample.0.weight")
  assert (pretrained.torchvision_key(("layer2", 0, "downsample", "bn", "bias"))
          == "layer2.0.downsample.1.bias")
  assert pretrained.torchvision_key(("embedding", "kernel")) is None


def test_pure_conversion_uses_every_key(resnet18_state):
  params, batch_stats, sd = resnet18_state
  new_params, new_stats = pretrained.convert_torchvision_state_dict(sd, params, batch_stats)
  flat = dict(nnx.to_flat_state(new_params)) | dict(nnx.to_flat_state(new_stats))
  np.testing.assert_array_equal(flat[("layer1", 1, "conv2", "kernel")][...],
                                sd["layer1.1.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(flat[("layer3", 0, "downsample", "bn", "var")][...],
                                sd["layer3.0.downsample.1.running_var"])
  # The head is passed through as it was (here abstract, as given).
  assert flat[("embedding", "kernel")].shape == (512, EMBEDDING_DIM)
  assert isinstance(flat[("embedding", "kernel")].get_value(), jax.ShapeDtypeStruct)
  # num_batches_tracked is optional (older checkpoints predate it).
  no_counter = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
  pretrained.convert_torchvision_state_dict(no_counter, params, batch_stats)


@pytest.mark.slow
@pytest.mark.parametrize("mutation, pattern", [
    ("missing", r"missing key 'layer3\.1\.bn2\.running_var' \(expected shape \(256,\)\)"),
    ("missing_fc", r"missing key 'fc\.bias'"),
    ("extra", r"unexpected key 'layer5\.0\.conv1\.weight' \(shape \(3, 3\)\)"),
    ("misshapen", r"key 'layer2\.0\.conv1\.weight': expected shape \(128, 64, 3, 3\), "
                  r"got \(128, 64, 1, 1\)"),
    ("misshapen_fc", r"key 'fc\.weight': expected shape \(num_classes, 512\), got \(1000, 2048\)"),
    ("misshapen_counter", r"key 'bn1\.num_batches_tracked': expected shape \(\), got \(2,\)"),
])
def test_mismatch_names_the_key(resnet18_state, tmp_path, mutation, pattern):
  params, batch_stats, sd = resnet18_state
  sd = dict(sd)
  if mutation == "missing":
    del sd["layer3.1.bn2.running_var"]
  elif mutation == "missing_fc":
    del sd["fc.bias"]
  elif mutation == "extra":
    sd["layer5.0.conv1.weight"] = np.zeros((3, 3), np.float32)
  elif mutation == "misshapen":
    sd["layer2.0.conv1.weight"] = np.zeros((128, 64, 1, 1), np.float32)
  elif mutation == "misshapen_fc":
    sd["fc.weight"] = np.zeros((1000, 2048), np.float32)
  elif mutation == "misshapen_counter":
    sd["bn1.num_batches_tracked"] = np.zeros((2,), np.int64)
  with pytest.raises(pretrained.WeightMismatchError, match=pattern):
    pretrained.convert_torchvision_state_dict(sd, params, batch_stats)
  # Same through a file and the converter's check.
  path = tmp_path / "bad.npz"
  convert_weights.save_state_dict(sd, path)
  model = nnx.eval_shape(lambda: create_model("resnet18", EMBEDDING_DIM, rngs=nnx.Rngs(0)))
  with pytest.raises(pretrained.WeightMismatchError, match=pattern):
    pretrained.load_torchvision_weights(model, path)
  with pytest.raises(pretrained.WeightMismatchError, match=pattern):
    convert_weights.convert(path, tmp_path / "out.npz", model="resnet18")
  assert not (tmp_path / "out.npz").exists()


def test_wrong_architecture_lists_keys(resnet18_state):
  _, _, sd = resnet18_state
  abstract = nnx.eval_shape(lambda: create_model("resnet50", EMBEDDING_DIM, rngs=nnx.Rngs(0)))
  with pytest.raises(pretrained.WeightMismatchError, match=r"missing key 'layer1\.0\.conv3\.weight'"):
    pretrained.check_torchvision_state_dict(
        sd, nnx.state(abstract, nnx.Param), nnx.state(abstract, nnx.BatchStat))


@pytest.mark.slow
def test_npz_load_without_torch(resnet18_state, tmp_path):
  _, _, sd = resnet18_state
  path = tmp_path / "w.npz"
  convert_weights.save_state_dict(sd, path)
  model = create_model("resnet18", EMBEDDING_DIM, rngs=nnx.Rngs(0))
  pretrained.load_torchvision_weights(model, path)
  np.testing.assert_array_equal(model.layer4[0].conv1.kernel[...],
                                sd["layer4.0.conv1.weight"].transpose(2, 3, 1, 0))


def test_file_errors(tmp_path):
  model = nnx.eval_shape(lambda: create_model("small", EMBEDDING_DIM, rngs=nnx.Rngs(0)))
  bad_ext = tmp_path / "weights.bin"
  bad_ext.write_bytes(b"")
  with pytest.raises(ValueError, match=r"unsupported weights file .*weights\.bin.*\.pth"):
    pretrained.load_torchvision_weights(model, bad_ext)
  with pytest.raises(FileNotFoundError, match=r"weights file not found: .*nope\.npz"):
    pretrained.load_torchvision_weights(model, tmp_path / "nope.npz")
  assert convert_weights.main([f"--input={tmp_path / 'nope.pth'}",
                               f"--output={tmp_path / 'x.npz'}"]) == 1
  with pytest.raises(ValueError, match=r"unsupported output"):
    convert_weights.convert(tmp_path / "nope.pth", tmp_path / "x.pth")


@pytest.mark.slow
def test_imports_need_neither_torch_nor_tensorflow():
  """hn_jax.pretrained / convert_weights and benchmarks/pretrained_check.py import cleanly
  and import neither torch, safetensors nor tensorflow."""
  code = (
      "import importlib.util, sys\n"
      "import hn_jax.pretrained, hn_jax.tools.convert_weights\n"
      "spec = importlib.util.spec_from_file_location('pretrained_check', "
      "'benchmarks/pretrained_check.py')\n"
      "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
      "bad = [m for m in ('torch', 'torchvision', 'safetensors', 'tensorflow') if m in sys.modules]\n"
      "assert not bad, bad\n")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})
