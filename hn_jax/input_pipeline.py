"""Host-side input: the batch samplers (NumPy) and the image pipeline (tf.data).

A training epoch is a stream of dataset indices built by a sampler (PROTOCOL section 2),
seeded by (seed, epoch) so that a resumed run sees the same order. The stream is cut into
global batches; each process keeps only its own contiguous rows of every global batch, and
tf.data reads, decodes and augments them with stateless random ops keyed by the image's
position in the run, so augmentation too is reproducible and independent of the number of
hosts.

A `Split` holds its labels in memory and its images either in memory (uint8, for the small
embedded sets) or as a `RecordSource`: the ArrayRecord files that `hn_jax.prepare` wrote,
read by index (the samplers pick arbitrary indices) in chunks, parsed and decoded (JPEG of
any kind PIL writes, including grayscale and CMYK, or PNG; always to RGB) in parallel by a
deterministic tf.data map. With `config.cache_images`, a split's images are decoded and
resized once and kept in memory (uint8, shorter side already at the train or eval size),
for the small sets (CUB, CARS) on hosts with few cores; the cached pixels are rounded to
uint8 after the resize, the uncached ones are not, which changes them by at most 1/255.

Nothing here runs inside jit: the step receives finished float32 arrays.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Iterator, Sequence

import ml_collections
import numpy as np
import tensorflow as tf

SAMPLERS = ("filled", "sample")


class RecordSource:
  """The encoded images of one prepared split: its ArrayRecord files, read by index.

  Each record is a TFDS-serialized example whose `image` feature holds the encoded file.
  Files are opened lazily (so a source can be built on every host without reading).
  """

  def __init__(self, paths: Sequence[str], num_records: int | None = None):
    self.paths = [os.fspath(p) for p in paths]
    self._num_records = num_records
    self._source = None
    self._lock = threading.Lock()

  def _open(self):
    with self._lock:
      if self._source is None:
        from array_record.python import array_record_data_source as ards  # pylint: disable=g-import-not-at-top
        self._source = ards.ArrayRecordDataSource(self.paths)
    return self._source

  def __len__(self) -> int:
    if self._num_records is None:
      self._num_records = len(self._open())
    return self._num_records

  def read(self, indices: Sequence[int]) -> list[bytes]:
    """The serialized records at `indices`, in that order."""
    source = self._source or self._open()
    return list(source.__getitems__([int(i) for i in indices]))


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """One split of a dataset: its images and its int labels (N,), in the same order.

  `images` is a uint8 array (N, H, W, 3) held in memory, or a `RecordSource`. `chains`
  (Hotels-50K) gives each image's hotel chain, -1 when unknown.
  """

  images: np.ndarray | RecordSource
  labels: np.ndarray
  chains: np.ndarray | None = None
  # Decoded images kept by `config.cache_images`, by (kind, image size).
  cache: dict = dataclasses.field(default_factory=dict, repr=False)

  def __len__(self) -> int:
    return len(self.labels)


# ---------------------------------------------------------------------------------------------
# Samplers: pure NumPy index streams.


def _class_members(labels: np.ndarray) -> list[np.ndarray]:
  classes, inverse = np.unique(labels, return_inverse=True)
  order = np.argsort(inverse, kind="stable")
  return np.split(order, np.cumsum(np.bincount(inverse, minlength=len(classes)))[:-1])


def filled_epoch(labels: np.ndarray, images_per_class: int,
                 rng: np.random.Generator) -> np.ndarray:
  """CUB/CARS sampler: every class padded (with replacement) to the largest class's size.

  Each class is brought to length L, the largest class size rounded up to a multiple of
  `images_per_class`, by drawing extra images of that class with replacement, and
  shuffled; classes are shuffled; the stream then takes `images_per_class` images of
  every class in turn, round after round. Length: num_classes x L.
  """
  members = _class_members(labels)
  m = images_per_class
  length = -(-max(len(c) for c in members) // m) * m
  table = np.empty((len(members), length), dtype=np.int64)
  for row, idx in enumerate(members):
    extra = rng.choice(idx, size=length - len(idx), replace=True)
    table[row] = rng.permutation(np.concatenate([idx, extra]))
  table = table[rng.permutation(len(members))]
  rounds = table.reshape(len(members), length // m, m).transpose(1, 0, 2)
  return rounds.reshape(-1)


def sample_epoch(labels: np.ndarray, images_per_class: int, repeat: int,
                 rng: np.random.Generator) -> np.ndarray:
  """SOP/In-shop/Hotels sampler: `images_per_class` images of every class, `repeat` times.

  Each round draws `images_per_class` images of each class without replacement, shuffles
  the classes and concatenates them. Unlike the release, classes with fewer images than
  `images_per_class` are left out: they hold no positive pair, and keeping them would
  break the alignment of pairs within batches and across hosts.
  """
  members = [c for c in _class_members(labels) if len(c) >= images_per_class]
  rounds = []
  for _ in range(repeat):
    picks = np.stack([rng.choice(c, size=images_per_class, replace=False) for c in members])
    rounds.append(picks[rng.permutation(len(members))].reshape(-1))
  return np.concatenate(rounds) if rounds else np.zeros((0,), np.int64)


def epoch_indices(labels: np.ndarray, config: ml_collections.ConfigDict, epoch: int) -> np.ndarray:
  """The full (all hosts) index stream of one epoch, as the config's sampler builds it."""
  rng = np.random.default_rng([config.seed, epoch])
  if config.sampler == "filled":
    return filled_epoch(labels, config.images_per_class, rng)
  if config.sampler == "sample":
    return sample_epoch(labels, config.images_per_class, config.repeat, rng)
  raise ValueError(f"unknown sampler {config.sampler!r}; choose one of {', '.join(SAMPLERS)}")


def steps_per_epoch(labels: np.ndarray, config: ml_collections.ConfigDict) -> int:
  """Complete global batches in an epoch (its length does not depend on the seed)."""
  return len(epoch_indices(labels, config, 0)) // config.batch_size


def host_rows(indices: np.ndarray, global_batch: int, process_index: int,
              process_count: int) -> np.ndarray:
  """This process's rows of every complete global batch: (num_batches, global_batch / P)."""
  num_batches = len(indices) // global_batch
  local = global_batch // process_count
  batches = indices[:num_batches * global_batch].reshape(num_batches, global_batch)
  return batches[:, process_index * local:(process_index + 1) * local]


# ---------------------------------------------------------------------------------------------
# Images: decoding and transforms (tf.data).

# Images read per call into the ArrayRecord files (one Python call per chunk).
_READ_CHUNK = 32
_RECORD_FEATURES = {"image": tf.io.FixedLenFeature([], tf.string)}


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
  """An encoded JPEG (grayscale, RGB or CMYK) or PNG image -> uint8 RGB (H, W, 3)."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  return tf.ensure_shape(image, (None, None, 3))


def _resize_shorter_side(image: tf.Tensor, size: int) -> tf.Tensor:
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = size / tf.reduce_min(shape)
  new = tf.cast(tf.round(shape * scale), tf.int32)
  new = tf.maximum(new, size)
  return tf.image.resize(image, new, method="bilinear", antialias=True)


def _normalize(image: tf.Tensor, mean, std) -> tf.Tensor:
  return (image / 255.0 - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def _train_resize(image: tf.Tensor, config: ml_collections.ConfigDict) -> tf.Tensor:
  return _resize_shorter_side(tf.cast(image, tf.float32), int(1.1 * config.image_size))


def _resized_shape(shape: tf.Tensor, short: int) -> tf.Tensor:
  """(H, W) after resizing the shorter side to `short`, as `_resize_shorter_side` does."""
  hw = tf.cast(shape[:2], tf.float32)
  return tf.maximum(tf.round(hw * (short / tf.reduce_min(hw))), short)


def _crop_offsets(resized: tf.Tensor, seed: tf.Tensor, size: int) -> tf.Tensor:
  """Random (top, left) of a size x size crop of an image of shape `resized` (float32)."""
  limit = tf.cast(resized, tf.int32) - size + 1
  top_seed, left_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  top = tf.random.stateless_uniform([], top_seed, 0, limit[0], tf.int32)
  left = tf.random.stateless_uniform([], left_seed, 0, limit[1], tf.int32)
  return tf.stack([top, left])


def _flip_normalize(image: tf.Tensor, seed: tf.Tensor,
                    config: ml_collections.ConfigDict) -> tf.Tensor:
  image = tf.image.stateless_random_flip_left_right(image, seed=seed)
  return _normalize(image, config.mean, config.std)


def _crop_flip_normalize(image: tf.Tensor, seed: tf.Tensor,
                         config: ml_collections.ConfigDict) -> tf.Tensor:
  """The random crop and flip of an image already resized (the cached path)."""
  size = config.image_size
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  top, left = tf.unstack(_crop_offsets(tf.cast(tf.shape(image)[:2], tf.float32), crop_seed, size))
  image = tf.cast(image[top:top + size, left:left + size], tf.float32)
  return _flip_normalize(tf.ensure_shape(image, (size, size, 3)), flip_seed, config)


def train_transform(image: tf.Tensor, seed: tf.Tensor, config: ml_collections.ConfigDict) -> tf.Tensor:
  """Resize shorter side to int(1.1 x size), random size x size crop, random flip, normalize.

  The resize and the crop are one op: ScaleAndTranslate computes only the crop's pixels of
  the resized image (the same bilinear, antialiased filter as `tf.image.resize`, which is
  that op without translation), 1.35 times less CPU than resizing the whole image first.
  """
  size = config.image_size
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  image = tf.convert_to_tensor(image)
  resized = _resized_shape(tf.shape(image), int(1.1 * size))
  offset = tf.cast(_crop_offsets(resized, crop_seed, size), tf.float32)
  image = tf.raw_ops.ScaleAndTranslate(
      images=image[None], size=[size, size], scale=resized / tf.cast(tf.shape(image)[:2],
                                                                     tf.float32),
      translation=-offset, kernel_type="triangle", antialias=True)[0]
  return _flip_normalize(tf.ensure_shape(image, (size, size, 3)), flip_seed, config)


def _center_crop(image: tf.Tensor, config: ml_collections.ConfigDict) -> tf.Tensor:
  """Resize shorter side to size, center crop (float32, not normalized)."""
  size = config.image_size
  image = _resize_shorter_side(tf.cast(image, tf.float32), size)
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  top, left = (h - size) // 2, (w - size) // 2
  image = image[top:top + size, left:left + size]
  return tf.ensure_shape(image, (size, size, 3))


def eval_transform(image: tf.Tensor, config: ml_collections.ConfigDict) -> tf.Tensor:
  """Resize shorter side to size, center crop, normalize."""
  return _normalize(_center_crop(image, config), config.mean, config.std)


def _elements(split: Split, rows: np.ndarray) -> tuple[tf.data.Dataset, bool]:
  """The image of each of `rows`, in order, and whether elements still need decoding.

  In memory: uint8 images. From records: the serialized records, read in chunks.
  """
  rows = np.asarray(rows, np.int64)
  if isinstance(split.images, np.ndarray):
    images = tf.constant(split.images)
    return tf.data.Dataset.from_tensor_slices(rows).map(lambda i: tf.gather(images, i)), False
  source = split.images

  def read(chunk: np.ndarray) -> np.ndarray:
    return np.array(source.read(chunk), dtype=object)

  ds = tf.data.Dataset.from_tensor_slices(rows).batch(_READ_CHUNK)
  ds = ds.map(lambda chunk: tf.ensure_shape(tf.numpy_function(read, [chunk], tf.string,
                                                                stateful=False), (None,)),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.unbatch(), True


def _decoder(needs_decoding: bool):
  if not needs_decoding:
    return lambda element: element
  return lambda record: decode_image(tf.io.parse_single_example(record, _RECORD_FEATURES)["image"])


def _cached(split: Split, kind: str, config: ml_collections.ConfigDict):
  """Every image of `split` decoded and resized once: for "train", shorter side at
  int(1.1 x size) (flat uint8 buffer, offsets, shapes); for "eval", the center crop."""
  key = (kind, config.image_size)
  if key not in split.cache:
    elements, needs_decoding = _elements(split, np.arange(len(split)))
    decode = _decoder(needs_decoding)
    if kind == "train":
      prepare = lambda e: _train_resize(decode(e), config)
    else:
      prepare = lambda e: _center_crop(decode(e), config)
    ds = elements.map(lambda e: tf.cast(tf.clip_by_value(tf.round(prepare(e)), 0, 255), tf.uint8),
                      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    images = list(ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator())
    if kind == "train":
      shapes = np.array([im.shape for im in images], np.int64).reshape(-1, 3)
      sizes = shapes.prod(axis=1)
      offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
      flat = np.concatenate([im.reshape(-1) for im in images]) if images else np.zeros(0, np.uint8)
      split.cache[key] = (tf.constant(flat), tf.constant(offsets), tf.constant(shapes))
    else:
      split.cache[key] = tf.constant(np.stack(images))
  return split.cache[key]


def _train_images(split: Split, rows: np.ndarray, config: ml_collections.ConfigDict):
  """(dataset of per-row elements, element + seed -> transformed image)."""
  if config.get("cache_images", False):
    flat, offsets, shapes = _cached(split, "train", config)

    def image_at(i):
      return tf.reshape(flat[offsets[i]:offsets[i] + tf.reduce_prod(shapes[i])], shapes[i])

    ds = tf.data.Dataset.from_tensor_slices(np.asarray(rows, np.int64))
    return ds, lambda i, seed: _crop_flip_normalize(image_at(i), seed, config)
  ds, needs_decoding = _elements(split, rows)
  decode = _decoder(needs_decoding)
  return ds, lambda e, seed: train_transform(decode(e), seed, config)


def train_batches(split: Split, config: ml_collections.ConfigDict, epoch: int, *,
                  process_index: int = 0, process_count: int = 1,
                  first_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """This process's share of every training batch of `epoch`, from batch `first_step` on.

  Yields {"images": float32 (B/P, S, S, 3), "labels": int32 (B/P,)}.
  """
  rows = host_rows(epoch_indices(split.labels, config, epoch), config.batch_size,
                   process_index, process_count)
  num_batches, local = rows.shape
  # Position of each image in the whole run: the key of its augmentation.
  column = process_index * local + np.arange(local)
  positions = ((epoch * num_batches + np.arange(num_batches))[:, None] * config.batch_size
               + column[None, :])
  rows, positions = rows[first_step:].reshape(-1), positions[first_step:].reshape(-1)
  labels = np.asarray(split.labels)[rows].astype(np.int32)
  elements, transform = _train_images(split, rows, config)
  seed = tf.constant(config.seed, tf.int64)

  def load(element, position, label):
    return {"images": transform(element, tf.stack([seed, position])), "labels": label}

  ds = tf.data.Dataset.zip((elements,
                            tf.data.Dataset.from_tensor_slices(positions.astype(np.int64)),
                            tf.data.Dataset.from_tensor_slices(labels)))
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  yield from ds.as_numpy_iterator()


def eval_batches(split: Split, config: ml_collections.ConfigDict, *, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of every global eval batch, in order, the last one padded.

  Yields {"images", "labels", "mask"}; mask is False on padding. Concatenating the global
  batches and dropping the padding gives the split in its original order.
  """
  global_batch = config.eval_batch_size
  n = len(split)
  padded = -(-n // global_batch) * global_batch
  index = np.arange(padded)
  rows = host_rows(index, global_batch, process_index, process_count).reshape(-1)
  mask = rows < n
  rows = np.minimum(rows, n - 1)
  labels = np.asarray(split.labels)[rows].astype(np.int32)
  if config.get("cache_images", False):
    crops = _cached(split, "eval", config)
    elements = tf.data.Dataset.from_tensor_slices(rows.astype(np.int64))
    transform = lambda i: _normalize(tf.cast(tf.gather(crops, i), tf.float32), config.mean,
                                     config.std)
  else:
    elements, needs_decoding = _elements(split, rows)
    decode = _decoder(needs_decoding)
    transform = lambda e: eval_transform(decode(e), config)

  def load(element, label, valid):
    return {"images": transform(element), "labels": label, "mask": valid}

  ds = tf.data.Dataset.zip((elements, tf.data.Dataset.from_tensor_slices(labels),
                            tf.data.Dataset.from_tensor_slices(mask)))
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(global_batch // process_count, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  yield from ds.as_numpy_iterator()
