"""Which images make each batch: the samplers' index streams and each image's augmentation draws.

A training epoch is a stream of dataset indices built by a sampler (docs/protocol.md section 2),
seeded by (seed, epoch) so that a resumed run sees the same order. The stream is cut into
global batches; each process keeps only its own contiguous rows of every global batch. Each
image's random crop and flip are drawn from a counter-based hash of (seed, its position in
the run) (`augment_words`), so augmentation too is reproducible and independent of the
number of hosts. Pure NumPy.
"""

from __future__ import annotations

import ml_collections
import numpy as np

SAMPLERS = ("filled", "sample")



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
# Augmentation draws: a counter-based hash of (seed, position), the same on every path.


def _splitmix64(x: np.ndarray) -> np.ndarray:
  x = x + np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def augment_words(seed: int, positions: np.ndarray) -> np.ndarray:
  """Three uniform 32-bit words (int64) per position: crop top, crop left, flip.

  A pure function of (seed, position in the run): the crop offset is floor(word x limit /
  2**32) (`crop_offsets`), the flip the word's top bit.
  """
  positions = np.asarray(positions, np.int64).astype(np.uint64)
  with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as intended
    key = _splitmix64(np.array([seed % 2**64], np.uint64))
    words = [_splitmix64(_splitmix64(positions * np.uint64(3) + np.uint64(k)) ^ key)
             for k in range(3)]
  return (np.stack(words, axis=-1) >> np.uint64(32)).astype(np.int64)


def crop_offsets(words: np.ndarray, limits: np.ndarray) -> np.ndarray:
  """floor(word x limit / 2**32): uniform offsets in [0, limit)."""
  return (np.asarray(words, np.int64) * np.asarray(limits, np.int64)) >> 32
