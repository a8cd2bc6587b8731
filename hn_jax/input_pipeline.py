"""Host-side input: the batch samplers (NumPy) and the image transforms (tf.data).

A training epoch is a stream of dataset indices built by a sampler (PROTOCOL section 2),
seeded by (seed, epoch) so that a resumed run sees the same order. The stream is cut into
global batches; each process keeps only its own contiguous rows of every global batch, and
tf.data decodes and augments them with stateless random ops keyed by the image's position
in the run, so augmentation too is reproducible and independent of the number of hosts.

Nothing here runs inside jit: the step receives finished float32 arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import ml_collections
import numpy as np
import tensorflow as tf

SAMPLERS = ("filled", "sample")


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of a dataset held in memory: uint8 images (N, H, W, 3) and int labels (N,)."""

  images: np.ndarray
  labels: np.ndarray

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
# Image transforms: tf.data.


def _resize_shorter_side(image: tf.Tensor, size: int) -> tf.Tensor:
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = size / tf.reduce_min(shape)
  new = tf.cast(tf.round(shape * scale), tf.int32)
  new = tf.maximum(new, size)
  return tf.image.resize(image, new, method="bilinear", antialias=True)


def _normalize(image: tf.Tensor, mean, std) -> tf.Tensor:
  return (image / 255.0 - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def train_transform(image: tf.Tensor, seed: tf.Tensor, config: ml_collections.ConfigDict) -> tf.Tensor:
  """Resize shorter side to int(1.1 x size), random size x size crop, random flip, normalize."""
  size = config.image_size
  image = _resize_shorter_side(tf.cast(image, tf.float32), int(1.1 * size))
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  image = tf.image.stateless_random_crop(image, (size, size, 3), seed=crop_seed)
  image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
  return _normalize(image, config.mean, config.std)


def eval_transform(image: tf.Tensor, config: ml_collections.ConfigDict) -> tf.Tensor:
  """Resize shorter side to size, center crop, normalize."""
  size = config.image_size
  image = _resize_shorter_side(tf.cast(image, tf.float32), size)
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  top, left = (h - size) // 2, (w - size) // 2
  image = image[top:top + size, left:left + size]
  image = tf.ensure_shape(image, (size, size, 3))
  return _normalize(image, config.mean, config.std)


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
  images = tf.constant(split.images)
  labels = tf.constant(split.labels.astype(np.int32))

  def load(index, position):
    seed = tf.stack([tf.constant(config.seed, tf.int64), position])
    return {"images": train_transform(tf.gather(images, index), seed, config),
            "labels": tf.gather(labels, index)}

  ds = tf.data.Dataset.from_tensor_slices((rows, positions.astype(np.int64)))
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
  images = tf.constant(split.images)
  labels = tf.constant(split.labels.astype(np.int32))

  def load(i, valid):
    j = tf.minimum(i, n - 1)
    return {"images": eval_transform(tf.gather(images, j), config),
            "labels": tf.gather(labels, j), "mask": valid}

  ds = tf.data.Dataset.from_tensor_slices((rows, mask))
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(global_batch // process_count, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  yield from ds.as_numpy_iterator()
