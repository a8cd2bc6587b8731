"""The backbones beyond the ResNets: GoogLeNet (torchvision's layout) and the ViTs (timm's).

Each is compared with a PyTorch reference holding the reference library's state-dict keys
(hn_jax.testing.torch_reference: written from torchvision's and timm's layouts, as neither
library is installable beside the CPU build of torch that requirements-test.txt pins), on random
weights written by that reference with `torch.save`, the reference run in float64 and JAX in
float32 at "highest" precision. The tiny variants (googlenet_mini, vit_mini) train a few
steps on the digits.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import cub_googlenet, digits, vit_s16
from hn_jax import models, pretrained, run_config, sharding, train_step
from hn_jax.data import in_memory, samplers
from hn_jax.testing import torch_reference
from hn_jax.tools import convert_weights

torch = pytest.importorskip("torch")

EMBEDDING_DIM = 16
TOLERANCE = 1e-5  # norm-wise relative error against the float64 reference
GOOGLENET_KEYS = 364  # torchvision's googlenet(aux_logits=True) state dict, as in its file
VIT_S_KEYS = 150  # timm's vit_small_patch16_224 with num_classes=0 (DINO's file: the same)


def _model(name: str, **kwargs) -> nnx.Module:
  """`name`'s model with zeros everywhere, for weights read from a file: no random init to
  compile."""
  abstract = nnx.eval_shape(lambda: models.create_model(name, EMBEDDING_DIM, rngs=nnx.Rngs(0),
                                                        **kwargs))
  graphdef, state = nnx.split(abstract)
  return nnx.merge(graphdef, jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), state))


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _features_highest(model: nnx.Module, images: np.ndarray) -> np.ndarray:
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, images):
    return nnx.merge(graphdef, state).features(images)

  with jax.default_matmul_precision("highest"):
    return np.asarray(run(state, jnp.asarray(images)))


def _torch_features(model, images: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model.double().features(torch.from_numpy(images).permute(0, 3, 1, 2).double()).numpy()


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# GoogLeNet.


@pytest.fixture(scope="module")
def googlenet_file(tmp_path_factory):
  """(torch GoogLeNet in eval mode, path of its state dict with aux1/aux2 keys)."""
  torch.manual_seed(0)
  model = torch_reference.build_torch_googlenet(1000, aux_logits=True)
  torch_reference.randomize_norms(model, seed=1)  # (GoogLeNet has no LayerNorm)
  model.eval()
  path = tmp_path_factory.mktemp("googlenet") / "googlenet.pth"
  torch.save(model.state_dict(), path)
  return model, path


@pytest.mark.slow
def test_googlenet_matches_torchvision_layout(googlenet_file, caplog):
  torch_model, path = googlenet_file
  sd = torch_model.state_dict()
  assert len(sd) == GOOGLENET_KEYS and sum(k.startswith(("aux1.", "aux2.")) for k in sd) == 20
  model = _model("googlenet")
  model.embedding.kernel[...] = np.ones(model.embedding.kernel.shape, np.float32)
  head = np.asarray(model.embedding.kernel[...])
  with caplog.at_level(logging.INFO):
    pretrained.load_torchvision_weights(model, path)
  assert [r.getMessage() for r in caplog.records if "aux" in r.getMessage()] == [
      "GoogLeNet weights: ignored the 20 keys of the auxiliary classifiers (aux1.*, aux2.*), "
      "which the model does not build"]
  np.testing.assert_array_equal(model.embedding.kernel[...], head)
  want_kernel = sd["inception4c.branch4.1.conv.weight"].numpy().transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(model.inception4c.branch4.conv.kernel[...], want_kernel)
  model.eval()
  # 79 px: three of the max-pools round up (ceil_mode) where floor would not.
  images = _images(2, 79)
  want = _torch_features(torch_model, images)
  got = _features_highest(model, images)
  assert got.shape == want.shape == (2, 1024)
  assert np.std(want) > 1e-3
  err = _rel_err(got, want)
  print(f"\ngooglenet 79 px: relative error (norm) {err:.3e}")
  assert err <= TOLERANCE


def test_max_pool_ceil_mode_matches_torch():
  x = np.random.default_rng(0).standard_normal((1, 3, 10, 11)).astype(np.float32)
  for window, stride, padding in ((3, 2, 0), (2, 2, 0), (3, 1, 1), (3, 2, 1), (3, 3, 0)):
    want = torch.nn.functional.max_pool2d(torch.from_numpy(x), window, stride, padding,
                                          ceil_mode=True).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(models.max_pool_ceil(jnp.asarray(x.transpose(0, 2, 3, 1)), window,
                                          stride, padding))
    np.testing.assert_array_equal(got, want, err_msg=f"{window} {stride} {padding}")


@pytest.mark.slow
def test_googlenet_converted_files_and_key_errors(googlenet_file, tmp_path, capsys):
  _, path = googlenet_file
  want = _model("googlenet")
  pretrained.load_torchvision_weights(want, path)
  want_state = jax.tree.leaves(nnx.state(want, nnx.Param, nnx.BatchStat))
  for ext in (".npz", ".safetensors"):
    out = tmp_path / f"googlenet{ext}"
    assert convert_weights.main([f"--input={path}", f"--output={out}", "--model=googlenet"]) == 0
    assert f"wrote {GOOGLENET_KEYS} arrays" in capsys.readouterr().out
    got = _model("googlenet")
    pretrained.load_torchvision_weights(got, out)
    for a, b in zip(jax.tree.leaves(nnx.state(got, nnx.Param, nnx.BatchStat)), want_state):
      np.testing.assert_array_equal(a, b)
  sd = pretrained.read_state_dict(tmp_path / "googlenet.npz")
  abstract = nnx.eval_shape(lambda: models.create_model("googlenet", 8, rngs=nnx.Rngs(0)))
  params, stats = nnx.state(abstract, nnx.Param), nnx.state(abstract, nnx.BatchStat)
  no_aux = {k: v for k, v in sd.items() if not k.startswith("aux")}
  pretrained.check_torchvision_state_dict(no_aux, params, stats)  # aux keys are optional
  bad = dict(sd)
  del bad["inception5b.branch3.1.bn.running_var"]
  bad["inception4a.branch4.0.conv.weight"] = np.zeros((3,), np.float32)
  bad["conv2.conv.weight"] = np.zeros((64, 64, 3, 3), np.float32)
  with pytest.raises(pretrained.WeightMismatchError) as e:
    pretrained.check_torchvision_state_dict(bad, params, stats)
  assert str(e.value).splitlines()[1:] == [
      "  key 'conv2.conv.weight': expected shape (64, 64, 1, 1), got (64, 64, 3, 3)",
      "  missing key 'inception5b.branch3.1.bn.running_var' (expected shape (128,))",
      "  unexpected key 'inception4a.branch4.0.conv.weight' (shape (3,))"]
  resnet = {k: v for k, v in sd.items() if k.startswith("fc.")}
  with pytest.raises(pretrained.WeightMismatchError, match=r"missing key 'conv1\.conv\.weight'"):
    pretrained.check_torchvision_state_dict(resnet, params, stats)


# ---------------------------------------------------------------------------------------------
# ViTs.


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
  """(torch ViT-S/16 at 224 px with a 1000-class head, path of its state dict)."""
  torch.manual_seed(0)
  model = torch_reference.build_torch_vit(image_size=224, num_classes=1000)
  with torch.no_grad():  # no LayerNorm at its init values (1, 0): a real comparison
    for m in model.modules():
      if isinstance(m, torch.nn.LayerNorm):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.1)
  model.eval()
  path = tmp_path_factory.mktemp("vit") / "vit_small_patch16_224.pth"
  torch.save(model.state_dict(), path)
  return model, path


@pytest.mark.slow
def test_vit_small_matches_timm_layout_at_224(vit_file):
  torch_model, path = vit_file
  assert len(torch_model.state_dict()) == VIT_S_KEYS + 2  # + head.weight, head.bias
  model = _model("vit_small_patch16")
  pretrained.load_torchvision_weights(model, path)
  images = _images(2, 224)
  want = _torch_features(torch_model, images)
  got = _features_highest(model, images)
  assert got.shape == want.shape == (2, 384)
  err = _rel_err(got, want)
  print(f"\nvit_small_patch16 224 px: relative error (norm) {err:.3e}")
  assert err <= TOLERANCE


@pytest.mark.slow
def test_vit_small_at_256_from_224_weights(vit_file, tmp_path, caplog):
  """256 px from 224 px weights, both ways timm does it: the grid resized when the weights are
  read (timm's checkpoint filter, a model built for 256 px), and on the fly (a 224 px model
  fed 256 px images, timm's dynamic_img_size). DINO's file layout: no head."""
  torch_model, path = vit_file
  sd = {k: v for k, v in torch_model.state_dict().items() if not k.startswith("head.")}
  dino = tmp_path / "dino_deitsmall16_pretrain.pth"
  torch.save(sd, dino)
  images = _images(2, 256, seed=1)

  torch_256 = torch_reference.build_torch_vit(image_size=256)
  torch_256.load_state_dict_resized(sd)
  torch_256.eval()
  want = _torch_features(torch_256, images)
  model = _model("vit_small_patch16", image_size=256)
  assert model.pos_embed.shape == (1, 257, 384)
  with caplog.at_level(logging.INFO):
    pretrained.load_torchvision_weights(model, dino)
  assert any("resized from a 14x14 grid to 16x16" in r.getMessage() for r in caplog.records)
  err_load = _rel_err(_features_highest(model, images), want)

  want = _torch_features(torch_model, images)  # the 224 px reference, resizing on the fly
  model = _model("vit_small_patch16")
  pretrained.load_torchvision_weights(model, dino)
  err_dynamic = _rel_err(_features_highest(model, images), want)
  print(f"\nvit_small_patch16 256 px: relative error (norm) {err_load:.3e} (resized at load), "
        f"{err_dynamic:.3e} (on the fly)")
  assert err_load <= TOLERANCE and err_dynamic <= TOLERANCE


@pytest.mark.slow
def test_pos_embed_resampling_matches_torch_antialiased_bicubic():
  for old, new in ((14, 16), (14, 12), (7, 10), (16, 5), (3, 3)):
    pos = np.random.default_rng(old).standard_normal((1, 1 + old * old, 4))
    grid = torch.from_numpy(pos[:, 1:]).reshape(1, old, old, 4).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic",
                                           antialias=True, align_corners=False)
    want = want.permute(0, 2, 3, 1).reshape(1, -1, 4).numpy()
    got = models.resample_pos_embed(pos, (new, new))
    np.testing.assert_array_equal(got[:, :1], pos[:, :1])  # the class token is kept
    np.testing.assert_allclose(got[:, 1:], want, rtol=0, atol=1e-12, err_msg=f"{old}->{new}")
    jax_got = models.resample_pos_embed(jnp.asarray(pos, jnp.float32), (new, new))
    np.testing.assert_allclose(np.asarray(jax_got), got, rtol=0, atol=1e-5)


def test_vit_key_errors():
  abstract = nnx.eval_shape(lambda: models.create_model("vit_small_patch16", 8,
                                                        rngs=nnx.Rngs(0)))
  params, stats = nnx.state(abstract, nnx.Param), nnx.state(abstract, nnx.BatchStat)
  shapes = pretrained.expected_torchvision_shapes(params, stats)
  assert len(shapes) == VIT_S_KEYS
  assert shapes["blocks.11.attn.qkv.weight"] == (1152, 384)
  assert shapes["patch_embed.proj.weight"] == (384, 3, 16, 16)
  sd = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
  sd["pos_embed"] = np.zeros((1, 1 + 24 * 24, 384), np.float32)  # a 384 px file: accepted
  pretrained.check_torchvision_state_dict(sd, params, stats)
  sd["pos_embed"] = np.zeros((1, 200, 384), np.float32)
  sd["head.weight"] = np.zeros((1000, 384), np.float32)
  sd["reg_token"] = np.zeros((1, 4, 384), np.float32)
  del sd["blocks.3.mlp.fc2.bias"]
  with pytest.raises(pretrained.WeightMismatchError) as e:
    pretrained.check_torchvision_state_dict(sd, params, stats)
  assert str(e.value).splitlines() == [
      "timm state dict does not match the model (4 problem(s)):",
      "  missing key 'blocks.3.mlp.fc2.bias' (expected shape (384,))",
      "  key 'pos_embed': expected shape (1, 1 + g*g, 384) (a class token and a square grid "
      "of patches), got (1, 200, 384)",
      "  missing key 'head.bias' (timm's classifier, read and dropped)",
      "  unexpected key 'reg_token' (shape (1, 4, 384))"]


def test_vit_base_shapes():
  abstract = nnx.eval_shape(lambda: models.create_model("vit_base_patch16", 8,
                                                        rngs=nnx.Rngs(0)))
  shapes = pretrained.expected_torchvision_shapes(nnx.state(abstract, nnx.Param),
                                                  nnx.state(abstract, nnx.BatchStat))
  assert len(shapes) == VIT_S_KEYS and abstract.feature_dim == 768
  assert shapes["pos_embed"] == (1, 197, 768) and shapes["blocks.0.mlp.fc1.weight"] == (3072, 768)


# ---------------------------------------------------------------------------------------------
# The tiny variants train on the digits.


def _digits_batch(config):
  data = in_memory.digits().train
  order = samplers.epoch_indices(data.labels, config, 0)[:config.batch_size]
  scale = config.image_size // data.images.shape[1]
  images = np.kron(data.images[order], np.ones((1, scale, scale, 1), np.uint8))
  return images, data.labels[order].astype(np.int32)


@pytest.mark.parametrize("name, optimizer", [("googlenet_mini", "sgd"),
                                             ("vit_mini", "adamw")])
@pytest.mark.slow
def test_tiny_variant_trains_on_digits(name, optimizer):
  config = digits.get_config()
  config.model, config.batch_size, config.embedding_dim = name, 32, 16
  if optimizer == "adamw":
    config.update(optimizer="adamw", learning_rate=1e-3, weight_decay=0.05, warmup_epochs=1,
                  lr_schedule="cosine", cosine_epochs=3)
  images, labels = _digits_batch(config)
  mesh = sharding.create_mesh(jax.devices()[:2])
  graphdef, state, tx = train_step.init_state(config, steps_per_epoch=2)
  before = jax.device_get(state.params)
  state = sharding.replicate(state, mesh)
  step = train_step.make_train_step(graphdef, tx, config, mesh)
  batch = sharding.global_batch({"images": images, "labels": labels}, mesh)
  losses = []
  for _ in range(4):
    state, metrics = step(state, batch["images"], batch["labels"])
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses)) and int(metrics["skipped_steps"]) == 0
  moved = [not np.array_equal(a, b) for a, b in
           zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params)))]
  assert all(moved)
  if name == "googlenet_mini":  # dropout drew a fresh mask each step, its count checkpointed
    assert int(state.batch_stats["dropout"]["count"][...]) == 4
  print(f"\n{name} ({optimizer}): loss {losses[0]:.4f} -> {losses[-1]:.4f}")


def test_backbone_configs_validate():
  configs = [cub_googlenet.get_config(), *(vit_s16.get_config(d) for d in ("cub", "cars", "sop"))]
  for config, model in zip(configs, ["googlenet"] + ["vit_small_patch16"] * 3):
    run_config.validate(config, num_devices=8, num_processes=1)
    assert config.model == model
  assert [c.dataset for c in configs[1:]] == ["cub", "cars", "sop"] and configs[3].repeat == 5
  with pytest.raises(ValueError, match="choose one of cub, cars, sop"):
    vit_s16.get_config("inshop")
  config.image_size = 250
  with pytest.raises(run_config.ConfigError, match=r"config.image_size=250 must be a multiple "
                     r"of vit_small_patch16's patch size 16; try --config.image_size=240"):
    run_config.validate(config, num_devices=8, num_processes=1)
