"""The decoded-image cache: its file (atomic, checked, keyed), the modes, and uint8 batches
normalized inside the jitted step exactly as the host did before."""

import errno
import os

import jax
import ml_collections
import numpy as np
import pytest

from hn_jax import run_config, sharding, train_step
from hn_jax.data import image_cache, input_pipeline, splits


def _config(**overrides):
  config = ml_collections.ConfigDict(dict(
      seed=0, sampler="filled", images_per_class=2, repeat=1, batch_size=8, image_size=16,
      eval_batch_size=8, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), cache="disk",
      cache_dir="", cache_memory_gb=0.0))
  config.update(overrides)
  return config


def _split(n=20, seed=0, name="toy-train"):
  rng = np.random.default_rng(seed)
  shape = (30, 44) if seed % 2 == 0 else (44, 30)
  return splits.Split(rng.integers(0, 256, (n, *shape, 3), dtype=np.uint8), np.arange(n) % 5,
                  name=name)


def _images(count, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3),
                       dtype=np.uint8) for _ in range(count)]


KEY = image_cache.CacheKey("test", "train", 16)


def test_file_round_trip_in_memory_and_mapped(tmp_path):
  images = _images(7)
  path = str(tmp_path / "c.hnimg")
  image_cache.write_file(path, KEY, iter(images), len(images))
  assert os.listdir(tmp_path) == ["c.hnimg"], "no temporary file is left"
  for load in (True, False):
    cache = image_cache.read_file(path, KEY, load=load)
    assert cache.in_memory == load and len(cache) == 7
    for i, image in enumerate(images):
      np.testing.assert_array_equal(cache.image(i), image)
  with pytest.raises(image_cache.CorruptCache, match="other settings"):
    image_cache.read_file(path, image_cache.CacheKey("test", "train", 32), load=True)


@pytest.mark.parametrize("damage", ["truncate", "cut_tail", "flip_pixel", "flip_table", "empty"])
def test_damaged_files_are_detected(tmp_path, damage):
  images = _images(5, seed=1)
  path = str(tmp_path / "c.hnimg")
  image_cache.write_file(path, KEY, iter(images), len(images))
  data = bytearray(open(path, "rb").read())
  if damage == "truncate":
    data = data[:len(data) // 2]
  elif damage == "cut_tail":
    data = data[:-3]
  elif damage == "flip_pixel":
    data[16 + 20] ^= 1
  elif damage == "flip_table":
    pixels = sum(i.size for i in images)
    data[16 + pixels + 2] ^= 1
  else:
    data = b""
  open(path, "wb").write(bytes(data))
  with pytest.raises(image_cache.CorruptCache):
    image_cache.read_file(path, KEY, load=damage == "flip_pixel")


def test_full_disk_leaves_nothing_and_says_what_to_do(tmp_path, monkeypatch):
  def images():
    yield np.zeros((4, 4, 3), np.uint8)
    raise OSError(errno.ENOSPC, "No space left on device")

  path = str(tmp_path / "c.hnimg")
  with pytest.raises(image_cache.CacheError) as error:
    image_cache.write_file(path, KEY, images(), 3, expected_bytes=48)
  message = str(error.value)
  assert "No space left on device" in message and "--config.cache_dir" in message
  assert "\n" not in message and os.listdir(tmp_path) == []


def test_disk_cache_is_built_once_reused_and_rebuilt_when_corrupt(tmp_path, caplog):
  split = _split()
  config = _config(cache_dir=str(tmp_path))
  first = list(input_pipeline.train_batches(split, config, epoch=1))
  (name,) = os.listdir(tmp_path)
  assert name.startswith("toy-train-train16-") and name.endswith(".hnimg")
  ((policy, key),) = image_cache.opened(split)
  assert policy.mode == "disk" and not image_cache.opened(split)[(policy, key)].in_memory
  # A later run (a fresh Split of the same images) reuses the file: nothing is resized.
  calls = []
  real = image_cache.transform
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(image_cache, "transform", lambda *a: calls.append(1) or real(*a))
    again = list(input_pipeline.train_batches(_split(), config, epoch=1))
    assert calls == []
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["images"], b["images"])
  # A damaged file is reported in one line and rebuilt.
  path = tmp_path / name
  data = bytearray(path.read_bytes())
  data[100] ^= 0xFF
  path.write_bytes(bytes(data))
  with caplog.at_level("WARNING"):
    rebuilt = list(input_pipeline.train_batches(_split(), config, epoch=1))
  assert any("unusable" in r.getMessage() and "rebuilding" in r.getMessage()
             for r in caplog.records)
  for a, b in zip(first, rebuilt):
    np.testing.assert_array_equal(a["images"], b["images"])
  assert len(image_cache.read_file(str(path), key, load=False)) == 20


def test_a_changed_setting_or_dataset_never_reuses_a_file(tmp_path):
  config = _config(cache_dir=str(tmp_path))
  input_pipeline.cache_of(_split(), "train", config)
  input_pipeline.cache_of(_split(), "eval", config)
  input_pipeline.cache_of(_split(), "train", _config(cache_dir=str(tmp_path), image_size=20))
  input_pipeline.cache_of(_split(seed=2), "train", config)  # other pixels, same name
  assert len(os.listdir(tmp_path)) == 4
  eval_cache = input_pipeline.cache_of(_split(), "eval", config)
  assert eval_cache.stacked.shape == (20, 16, 16, 3)


def test_auto_picks_memory_then_disk_then_off(tmp_path, monkeypatch, caplog):
  split = _split()
  size = 20 * 17 * 25 * 3  # 20 images of 30 x 44 resized to 17 x 25 (shorter side 17)
  cache = input_pipeline.cache_of(split, "train", _config(cache="auto", cache_dir=str(tmp_path)))
  assert cache.in_memory and cache.nbytes == size
  assert len(os.listdir(tmp_path)) == 1, "memory: also saved for later runs"
  tiny = dict(cache="auto", cache_memory_gb=1e-9)
  cache = input_pipeline.cache_of(_split(), "train", _config(cache_dir=str(tmp_path), **tiny))
  assert not cache.in_memory, "over the memory budget: memory-mapped"
  monkeypatch.setattr(image_cache, "_free_bytes", lambda folder: 0)
  other = _split(seed=4)
  with caplog.at_level("WARNING"):
    assert input_pipeline.cache_of(other, "train", _config(cache_dir=str(tmp_path), **tiny)) is None
  assert any("reading them uncached" in r.getMessage() for r in caplog.records)
  with pytest.raises(image_cache.CacheError, match="GB free"):
    input_pipeline.cache_of(other, "train", _config(cache_dir=str(tmp_path)))
  # A disk that fills up while auto writes: the images are read uncached, nothing is left.
  monkeypatch.setattr(image_cache, "_free_bytes", lambda folder: 1 << 40)
  monkeypatch.setattr(image_cache.os, "fsync", _no_space)
  assert input_pipeline.cache_of(other, "train", _config(cache_dir=str(tmp_path), **tiny)) is None
  assert len(os.listdir(tmp_path)) == 1
  with pytest.raises(image_cache.CacheError, match="set --config.cache_dir"):
    input_pipeline.cache_of(_split(), "train", _config())  # disk, but no folder


def _no_space(fd):
  raise OSError(errno.ENOSPC, "No space left on device")


def test_normalization_in_the_step_equals_the_host_float_pipeline():
  """The jitted normalization of uint8 pixels equals what tf.data computed on the host (and a
  float64 NumPy reference) to float32 rounding.

  The bound is a sum of roundings: x / 255 (u), mean and std rounded to float32 (u |mean|,
  u |out|), the subtraction (u |x / 255 - mean|, then / std) and the division (u |out|, one
  more if XLA multiplies by 1 / std), u = 2^-24: per pixel at most
  u ((1 + |mean|) / std + 4 |out|), 1.0e-6 here; measured 7.2e-7 against the reference
  and 6.8e-7 against tf.data, the same under --xla_cpu_max_isa=SSE4_2 and AVX."""
  import tensorflow as tf
  from hn_jax.data import tf_pipeline
  config = _config()
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
  images[0, 0, 0] = (0, 255, 128)
  ours = np.asarray(jax.jit(lambda x: train_step.normalize(x, config.mean, config.std))(images))
  host = tf_pipeline.normalize(tf.constant(images), config.mean, config.std).numpy()
  reference = (images / 255.0 - np.array(config.mean)) / np.array(config.std)
  assert ours.dtype == np.float32
  mean, std = np.array(config.mean), np.array(config.std)
  bound = float(np.max(2.0**-24 * ((1 + np.abs(mean)) / std + 4 * np.abs(reference))))
  # Class (a), float32 vs float64 of 4 operations: 4x the worst-case bound above (both sides
  # of ours - host lie within it of the reference); a wrong mean or std would be off by 1e-3.
  np.testing.assert_allclose(ours, host, rtol=0, atol=4 * bound)
  np.testing.assert_allclose(ours, reference, rtol=0, atol=4 * bound)
  # Exact: float input is returned as it is, so its bits cannot change.
  floats = np.asarray(train_step.normalize(reference.astype(np.float32), config.mean, config.std))
  np.testing.assert_array_equal(floats, reference.astype(np.float32))


@pytest.mark.slow
def test_training_on_uint8_batches_gives_the_losses_of_host_normalized_batches():
  """The train step fed uint8 crops (mirrored and normalized in the step) against the same
  crops mirrored and normalized on the host in float32, as the pipeline did before.

  Only the first step's loss is compared: it is computed from the initial weights, a
  continuous function of the pixels (the hardest negative's similarity is a max, continuous
  even where the argmax switches). Later steps are not: a near-tie that the argmax resolves
  differently changes the gradient by a whole triplet's term, so after a step or two runs
  that differ by an ulp anywhere part by an amount that depends on the CPU's kernels (1e-3
  relative after 3 steps on one machine, for one ulp of the initial weights).

  The pixels differ by a few roundings (XLA may divide in another order than NumPy;
  test_normalization_in_the_step_equals_the_host_float_pipeline bounds it, absolutely: near
  zero the subtraction cancels). The tolerance comes from this machine: the first step on the
  host images nudged by one rounding at random measures how one rounding of input moves the
  loss; the uint8 path, its pixels at most `m` roundings from the host's (measured here),
  must agree within 4 m times that, plus 2 ulps of the loss as a floor should the nudge
  happen to change nothing.

  The config, mesh and shapes are tests/test_train.py's, so that the uint8 step's program
  comes from (or goes to) the persistent compilation cache.
  """
  from configs import digits
  from hn_jax.data import datasets
  config = digits.get_config()
  config.update(dict(image_size=16, embedding_dim=16, batch_size=64, eval_batch_size=512,
                     num_epochs=2, eval_every=1, lr_drop_epochs=(2,)))
  split = datasets.load(config).train
  batches = list(input_pipeline.train_batches(split, config, epoch=1))[:3]
  mesh = sharding.create_mesh()
  mean, std = np.asarray(config.mean, np.float32), np.asarray(config.std, np.float32)
  rng = np.random.default_rng(0)

  def on_host(batch, nudge=False):
    images = np.where(batch["flips"][:, None, None, None], batch["images"][:, :, ::-1],
                      batch["images"])
    images = (images.astype(np.float32) / np.float32(255.0) - mean) / std
    if nudge:
      images = (images + rng.choice([-1.0, 1.0], size=images.shape) * _rounding(images)
                ).astype(np.float32)
    return dict(batch, images=images, flips=None)

  def _rounding(images):
    """One rounding of the normalization per pixel: u ((1 + |mean|) / std + |out|)."""
    return 2.0**-24 * ((1 + np.abs(mean)) / std + np.abs(images.astype(np.float64)))

  losses = {}
  for form, feed in (("uint8", batches), ("float32", [on_host(b) for b in batches[:1]]),
                     ("nudged", [on_host(b, nudge=True) for b in batches[:1]])):
    tx = train_step.create_optimizer(config, 920 // 64)
    graphdef, state = train_step.create_train_state(train_step.init_model(config), tx)
    state = sharding.replicate(state, mesh)
    step = train_step.make_train_step(graphdef, tx, config, mesh)
    losses[form] = []
    for batch in feed:
      on_device = sharding.global_batch({k: v for k, v in batch.items() if v is not None}, mesh)
      state, metrics = step(state, on_device["images"], on_device["labels"],
                            on_device.get("flips"))
      losses[form].append(float(metrics["loss"]))
  assert 0 < np.concatenate([b["flips"] for b in batches]).mean() < 1
  assert len(set(losses["uint8"])) == 3 and np.isfinite(losses["uint8"]).all(), "it trains"
  first = losses["float32"][0]
  # The pixels the step computes from uint8, against the host's, in roundings.
  host = on_host(batches[0])["images"]
  flipped = np.where(batches[0]["flips"][:, None, None, None], batches[0]["images"][:, :, ::-1],
                     batches[0]["images"])
  ours = np.asarray(jax.jit(lambda x: train_step.normalize(x, config.mean, config.std))(flipped))
  ulps = float(np.max(np.abs(ours - host) / _rounding(host)))
  assert ulps <= 8, "the normalization test's bound: a few roundings"
  ulp_effect = abs(losses["nudged"][0] - first)
  # Class (a)-like sanity: a float32 forward of this depth moves by ~sqrt(depth x fan-in)
  # roundings (~1e-5 relative); 1e-4: one rounding of input did not change the loss by more.
  assert ulp_effect < 1e-4 * abs(first), "one rounding of input must not change a forward"
  # Class (b), self-measured (see the docstring).
  assert abs(losses["uint8"][0] - first) <= 4 * max(ulps, 1) * ulp_effect + 2.4e-7 * abs(first)


def test_prefetch_to_device_keeps_order_and_values():
  mesh = sharding.create_mesh()
  n = jax.device_count()
  batches = [{"images": np.full((n, 2, 2, 3), i, np.uint8), "labels": np.arange(n) + i}
             for i in range(5)]
  out = list(input_pipeline.prefetch_to_device(iter(batches), mesh))
  assert len(out) == 5
  for i, batch in enumerate(out):
    assert isinstance(batch["images"], jax.Array) and batch["images"].dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(batch["images"]), batches[i]["images"])
    np.testing.assert_array_equal(np.asarray(batch["labels"]), batches[i]["labels"])


def test_the_old_cache_images_key_is_refused_with_its_replacement(tmp_path):
  from configs import digits
  config = digits.get_config()
  config.cache_images = True
  with pytest.raises(run_config.ConfigError, match="--config.cache=memory"):
    run_config.validate(config, num_devices=1, num_processes=1)
  config = digits.get_config()
  config.cache = "ram"
  with pytest.raises(run_config.ConfigError, match="auto, memory, disk, off"):
    run_config.validate(config, num_devices=1, num_processes=1)
  # A run from before config.cache still embeds: its config.json's old key is dropped.
  old = digits.get_config().to_dict()
  old.pop("cache")
  old["cache_images"] = False
  (tmp_path / "config.json").write_text(ml_collections.ConfigDict(old).to_json())
  loaded = run_config.read(str(tmp_path))
  assert "cache_images" not in loaded and loaded.cache == "auto"
