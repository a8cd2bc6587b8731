"""Samplers (docs/protocol.md section 2), host slicing, augmentation draws, transforms (section 3)."""

import ml_collections
import numpy as np
import pytest

from hn_jax.data import input_pipeline, samplers, splits
from hn_jax.data import tf_pipeline


def _config(**overrides):
  config = ml_collections.ConfigDict(dict(
      seed=0, sampler="filled", images_per_class=2, repeat=1, batch_size=8, image_size=16,
      eval_batch_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), cache="off"))
  config.update(overrides)
  return config


def _labels(sizes):
  return np.concatenate([np.full(n, 10 + c) for c, n in enumerate(sizes)])


@pytest.mark.parametrize("m", [2, 3])
def test_filled_epoch(m):
  sizes = [3, 5, 2, 7, 1]
  labels = _labels(sizes)
  stream = samplers.filled_epoch(labels, m, np.random.default_rng(0))
  length = -(-max(sizes) // m) * m
  assert len(stream) == len(sizes) * length
  groups = labels[stream].reshape(-1, m)
  assert np.all(groups == groups[:, :1]), "each group of m holds one class"
  rounds = groups[:, 0].reshape(length // m, len(sizes))
  assert np.all(rounds == rounds[:1]), "the class order repeats every round"
  assert sorted(rounds[0]) == sorted(set(labels))
  for c, n in enumerate(sizes):
    drawn = stream[labels[stream] == 10 + c]
    assert len(drawn) == length
    assert set(drawn) == set(np.flatnonzero(labels == 10 + c)), "every image of the class is used"


def test_sample_epoch():
  sizes = [1, 2, 3, 5, 4]
  labels = _labels(sizes)
  stream = samplers.sample_epoch(labels, 2, 3, np.random.default_rng(0))
  eligible = sum(n >= 2 for n in sizes)
  assert len(stream) == 3 * eligible * 2
  pairs = stream.reshape(-1, 2)
  assert np.all(labels[pairs[:, 0]] == labels[pairs[:, 1]])
  assert np.all(pairs[:, 0] != pairs[:, 1]), "drawn without replacement"
  for r in pairs.reshape(3, eligible, 2):
    assert sorted(labels[r[:, 0]]) == [11, 12, 13, 14], "each round covers each class once"
  orders = [tuple(labels[r[:, 0]]) for r in pairs.reshape(3, eligible, 2)]
  assert len(set(orders)) > 1, "classes are reshuffled each round"


def test_epoch_streams_are_seeded():
  labels = _labels([4, 6, 3, 8])
  for sampler in ("filled", "sample"):
    config = _config(sampler=sampler, repeat=2)
    a = samplers.epoch_indices(labels, config, 3)
    np.testing.assert_array_equal(a, samplers.epoch_indices(labels, config, 3))
    assert not np.array_equal(a, samplers.epoch_indices(labels, config, 4))
    config.seed = 1
    assert not np.array_equal(a, samplers.epoch_indices(labels, config, 3))


def test_steps_per_epoch_drops_incomplete_batch():
  labels = _labels([3, 5, 2, 7])  # filled: 4 classes x 8 = 32 images
  assert samplers.steps_per_epoch(labels, _config(batch_size=12)) == 2
  assert samplers.steps_per_epoch(labels, _config(batch_size=8)) == 4


def test_host_rows_partition_global_batches_without_splitting_pairs():
  labels = _labels([6, 6, 6, 6, 6])
  stream = samplers.filled_epoch(labels, 2, np.random.default_rng(1))
  parts = [samplers.host_rows(stream, 8, p, 4) for p in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts, axis=1).reshape(-1),
                                stream[:len(stream) // 8 * 8])
  for part in parts:
    assert np.all(labels[part[:, 0::2]] == labels[part[:, 1::2]])


def _split(n=30, classes=5, size=(12, 20)):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(n, *size, 3), dtype=np.uint8)
  return splits.Split(images, np.arange(n) % classes)


@pytest.mark.parametrize("cache", ["off", "memory"])
def test_train_batches_shapes_pairs_and_determinism(cache):
  split = _split()
  config = _config(cache=cache)
  batches = list(input_pipeline.train_batches(split, config, epoch=1))
  assert len(batches) == samplers.steps_per_epoch(split.labels, config)
  for b in batches:
    assert b["images"].shape == (8, 16, 16, 3) and b["images"].dtype == np.uint8
    assert np.all(b["labels"][0::2] == b["labels"][1::2])
  again = list(input_pipeline.train_batches(split, config, epoch=1))
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a["images"], b["images"])
  other_epoch = next(input_pipeline.train_batches(split, config, epoch=2))
  assert not np.array_equal(other_epoch["images"], batches[0]["images"])


@pytest.mark.parametrize("cache", ["off", "memory"])
def test_train_batches_host_slices_and_resume_offset_match_single_process(cache):
  split = _split()
  config = _config(cache=cache)
  full = list(input_pipeline.train_batches(split, config, epoch=1))
  halves = [list(input_pipeline.train_batches(split, config, epoch=1, process_index=p, process_count=2))
            for p in range(2)]
  for i, b in enumerate(full):
    joined = np.concatenate([halves[0][i]["images"], halves[1][i]["images"]])
    np.testing.assert_array_equal(joined, b["images"])
  tail = list(input_pipeline.train_batches(split, config, epoch=1, first_step=2))
  np.testing.assert_array_equal(tail[0]["images"], full[2]["images"])


def test_train_transform_crops_flips_and_normalizes():
  config = _config(image_size=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
  words = samplers.augment_words(0, np.arange(20))
  # A constant image stays constant through resize, crop and flip.
  image = np.full((10, 40, 3), 51, np.uint8)
  out = tf_pipeline.train_transform(image, words[7], config).numpy()
  assert out.shape == (16, 16, 3)
  # Class (a): 51 / 255 in float32 is within 2^-24 * 0.2 = 1.2e-8 of 0.2 (measured 3e-9);
  # atol 1e-6 leaves 80x for the resize's float32 weights, which sum to 1 within ulps.
  np.testing.assert_allclose(out, 0.2, atol=1e-6)
  # Shorter side resized to int(1.1 * 16) = 17: a crop of a 17-row ramp keeps 16 of its rows.
  ramp = np.repeat(np.repeat(np.arange(17, dtype=np.uint8)[:, None, None] * 10, 17, 1), 3, 2)
  crops = {tuple(tf_pipeline.train_transform(ramp, w, config).numpy()[:, 0, 0].round(4)) for w in words}
  assert len(crops) == 2, "a 17-pixel side leaves two vertical crop offsets"
  flips = [tf_pipeline.train_transform(ramp.transpose(1, 0, 2), w, config).numpy() for w in words]
  increasing = [f[0, 0, 0] < f[0, -1, 0] for f in flips]
  assert any(increasing) and not all(increasing), "some crops are flipped, some are not"


def test_eval_transform_center_crop_and_normalization():
  config = _config(image_size=16)
  image = np.zeros((16, 32, 3), np.uint8)
  image[:, 8:24] = 255  # the central 16 columns are white
  out = tf_pipeline.eval_transform(image, config).numpy()
  assert out.shape == (16, 16, 3)
  # Class (a): measured error 0 (255 / 255 = 1 exactly, then (1 - 0.5) / 0.25 = 2 exactly: _config's
  # mean and std are binary fractions); 1e-4 covers an ulp or two of 2 (2.4e-7) with room to spare.
  np.testing.assert_allclose(out, (1.0 - 0.5) / 0.25, atol=1e-4)


def test_eval_batches_keep_order_and_mark_padding():
  split = _split(n=21)
  config = _config(eval_batch_size=8)
  batches = list(input_pipeline.eval_batches(split, config))
  labels = np.concatenate([b["labels"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  assert len(labels) == 24 and mask.sum() == 21 and not mask[21:].any()
  np.testing.assert_array_equal(labels[:21], split.labels)
  halves = [list(input_pipeline.eval_batches(split, config, process_index=p, process_count=2))
            for p in range(2)]
  for i, b in enumerate(batches):
    np.testing.assert_array_equal(
        np.concatenate([halves[0][i]["images"], halves[1][i]["images"]]), b["images"])


def test_augment_words_are_uniform_and_keyed_by_seed_and_position():
  words = samplers.augment_words(0, np.arange(20000))
  assert words.shape == (20000, 3) and words.min() >= 0 and words.max() < 2**32
  np.testing.assert_array_equal(words[5:9], samplers.augment_words(0, np.arange(5, 9)))
  assert not np.array_equal(words[:100], samplers.augment_words(1, np.arange(100)))
  offsets = samplers.crop_offsets(words[:, 0], 26)
  assert offsets.min() == 0 and offsets.max() == 25
  counts = np.bincount(offsets, minlength=26)
  # Class (c): integer hashing of a fixed seed, the same on any CPU; the bounds are
  # 4-6 sigma of a uniform sample's spread (no floating-point rounding is involved).
  assert counts.min() > 0.8 * 20000 / 26 and counts.max() < 1.2 * 20000 / 26
  assert (samplers.crop_offsets(words[:, 1], 1) == 0).all(), "a side of the crop's size: offset 0"
  flips = words[:, 2] >> 31
  assert 0.48 < flips.mean() < 0.52
  assert abs(np.corrcoef(words[:, 0], words[:, 1])[0, 1]) < 0.03


@pytest.mark.parametrize("shape", [(12, 20), (40, 30), (375, 500), (8, 8)])
def test_numpy_resize_matches_tensorflow(shape):
  """The cache's NumPy resize of in-memory images is tf.image.resize's antialiased bilinear."""
  import tensorflow as tf
  from hn_jax.data import image_cache
  rng = np.random.default_rng(sum(shape))
  image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
  for short in (17, 281, 5):
    out_shape = image_cache.resized_shape(*shape, short)
    ours = image_cache.resize(image, *out_shape)
    theirs = tf.image.resize(tf.cast(image, tf.float32), out_shape, method="bilinear",
                             antialias=True).numpy()
    # Class (a), float32 vs float32 of one filter: both compute the sample coordinates in
    # float32, so a weight may differ by an ulp of the largest coordinate, times a step of up
    # to 255 between neighbouring noise pixels, in each of 2 passes; 4x that bound (6e-2 at
    # 500 pixels, 4e-3 at 28). Measured: 5.2e-3 at (375, 500) -> 281, 6e-4 elsewhere, the same
    # under SSE4_2/AVX/OPENBLAS_CORETYPE=SandyBridge. A wrong filter is off by tens of levels.
    coordinate_ulp = np.spacing(np.float32(max(*shape, *out_shape)))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=4 * 2 * 255 * coordinate_ulp)
    # Exact up to a pixel whose value lies within that rounding of a half level (< 1%).
    rounded = image_cache.to_uint8(ours).astype(int) - image_cache.to_uint8(theirs)
    assert np.abs(rounded).max() <= 1 and (rounded != 0).mean() < 0.01


def test_cached_and_uncached_batches_are_the_same_uint8():
  split = _split(n=30, size=(40, 50))
  for kind, batches in (("train", input_pipeline.train_batches), ("eval", input_pipeline.eval_batches)):
    kwargs = {"epoch": 1} if kind == "train" else {}
    off = list(batches(split, _config(cache="off"), **kwargs))
    cached = list(batches(split, _config(cache="memory"), **kwargs))
    assert len(off) == len(cached)
    for a, b in zip(off, cached):
      assert a["images"].dtype == b["images"].dtype == np.uint8
      diff = np.abs(a["images"].astype(int) - b["images"])
      # Half-level straddles of the two float32 resizes only (bound in the resize test).
      assert diff.max() <= 1 and (diff != 0).mean() < 0.001, kind
      np.testing.assert_array_equal(a["labels"], b["labels"])
      if kind == "train":
        np.testing.assert_array_equal(a["flips"], b["flips"])
        assert a["flips"].dtype == bool
