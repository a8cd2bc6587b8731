"""Host-side input: the batch samplers and the image batches (NumPy; tf.data when uncached).

A training epoch is a stream of dataset indices built by a sampler (docs/protocol.md section 2),
seeded by (seed, epoch) so that a resumed run sees the same order. The stream is cut into
global batches; each process keeps only its own contiguous rows of every global batch. Each
image's random crop and flip are drawn from a counter-based hash of (seed, its position in
the run) (`augment_words`), so augmentation too is reproducible and independent of the
number of hosts.

Batches are uint8 (B/P, S, S, 3) crops; the jitted step mirrors the ones drawn for a flip
and normalizes them (`train_step.flip`, `train_step.normalize`): on the accelerator both are
free, where NumPy mirrors 3-byte pixels ten times slower than it copies rows. The crops come
from a decoded-image cache (`image_cache`) when `config.cache` allows: NumPy slices of the
cached resized images, with no TensorFlow at all. Otherwise the tf.data path
(`tf_pipeline`) decodes, resizes and crops every image of every epoch. `prefetch_to_device`
keeps the next batches on their way to the devices while a step runs.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import shutil
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import ml_collections
import numpy as np
from absl import logging

from hn_jax import image_cache

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
    records = list(source.__getitems__([int(i) for i in indices]))
    with _READ_LOCK:
      RecordSource.records_read += len(records)
    return records

  def fingerprint(self) -> str:
    """A digest of the files' names, sizes and modification times."""
    stats = [(os.path.basename(p), os.path.getsize(p), os.stat(p).st_mtime_ns)
             for p in self.paths]
    return "files:" + hashlib.sha256(json.dumps(stats).encode()).hexdigest()


# Records read so far by every RecordSource of this process (each one an image to decode).
RecordSource.records_read = 0
_READ_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """One split of a dataset: its images and its int labels (N,), in the same order.

  `images` is a uint8 array (N, H, W, 3) held in memory, or a `RecordSource`. `chains`
  (Hotels-50K) gives each image's hotel chain, -1 when unknown. `name` (e.g. "cub-train")
  names its cache files, `fingerprint` identifies its images (default: a digest of the
  array or of the record files) and `cache_folder` is where its cache files go unless
  `config.cache_dir` says otherwise ("": nowhere, memory only).
  """

  images: np.ndarray | RecordSource
  labels: np.ndarray
  chains: np.ndarray | None = None
  name: str = ""
  fingerprint: str = ""
  cache_folder: str = ""
  # This process's decoded-image caches of the split, by (mode, CacheKey).
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


# ---------------------------------------------------------------------------------------------
# Decoded-image caches of a split.

# Threads that cut batches from a cache (1: the consumer's own thread). Measured on 2 shared
# cores, one thread is fastest (11,000 crops/s; two threads hand the GIL back and forth);
# hosts with more cores get up to 8 (copies release the GIL).
CACHE_THREADS = max(1, min(8, (os.cpu_count() or 1) // 2))


def _fingerprint(split: Split) -> str:
  if split.fingerprint:
    return split.fingerprint
  if "fingerprint" not in split.cache:
    if isinstance(split.images, RecordSource):
      split.cache["fingerprint"] = split.images.fingerprint()
    else:
      split.cache["fingerprint"] = image_cache.fingerprint_arrays(split.images)
  return split.cache["fingerprint"]


def _estimate_bytes(split: Split, key: image_cache.CacheKey) -> int:
  """The bytes of a split's cache: exact for eval and in-memory images, else from a sample."""
  n = len(split)
  if key.kind == "eval":
    return n * key.image_size**2 * 3
  if isinstance(split.images, np.ndarray):
    h, w = image_cache.resized_shape(*split.images.shape[1:3], key.short_side)
    return n * h * w * 3
  from hn_jax import tf_pipeline  # pylint: disable=g-import-not-at-top
  sample = np.unique(np.linspace(0, n - 1, min(n, 32)).astype(np.int64))
  shapes = tf_pipeline.decoded_shapes(split.images, sample)
  sizes = [np.prod(image_cache.resized_shape(h, w, key.short_side)) * 3 for h, w in shapes]
  return int(np.mean(sizes) * n * (1.0 if len(sample) == n else 1.05))


def _decode_all(split: Split, key: image_cache.CacheKey, where: str) -> Iterator[np.ndarray]:
  """Every image of the split in the cache's form, in order, behind a progress bar."""
  logging.info("image cache: decoding the %d images of %s for its %s cache (%s), once",
               len(split), split.name or "a split", key.kind, where)
  start = time.monotonic()
  if isinstance(split.images, np.ndarray):
    images = image_cache.transform_in_memory(split.images, key.kind, key.image_size)
  else:
    from hn_jax import tf_pipeline  # pylint: disable=g-import-not-at-top
    images = tf_pipeline.decoded(split.images, key.kind, key.image_size)
  desc = f"decoding {split.name or 'a split'} for its {key.kind} cache"
  yield from image_cache.progress_bar(images, len(split), desc)
  logging.info("image cache: %s's %s cache built in %.1f s", split.name or "the split",
               key.kind, time.monotonic() - start)


def _free_bytes(folder: str) -> int:
  try:
    os.makedirs(folder, exist_ok=True)
    if not os.access(folder, os.W_OK):
      return 0
    return shutil.disk_usage(folder).free
  except OSError:
    return 0


def _open_or_build(split: Split, key: image_cache.CacheKey, mode: str,
                   config: ml_collections.ConfigDict) -> image_cache.DecodedImages | None:
  folder = config.get("cache_dir", "") or split.cache_folder
  path = os.path.join(folder, image_cache.file_name(split.name, key)) if folder else None
  budget = (image_cache.memory_budget(config.get("cache_memory_gb", 0.0))
            - image_cache.memory_in_use())
  if path and os.path.exists(path):
    load = mode == "memory" or (mode == "auto" and os.path.getsize(path) <= budget)
    try:
      cache = image_cache.read_file(path, key, load=load)
      logging.info("image cache: %s %s", "loaded" if load else "mapped", path)
      return cache
    except image_cache.CorruptCache as e:
      logging.warning("image cache %s is unusable (%s): rebuilding it", path, e)
      os.remove(path)
  needed = _estimate_bytes(split, key)
  free = _free_bytes(folder) if folder else 0
  fits_disk = free >= needed + image_cache.DISK_MARGIN
  if mode == "auto":
    if needed <= budget:
      mode = "memory"
    elif path and needed + max(image_cache.DISK_MARGIN, free // 10) <= free:
      mode = "disk"  # leaving a tenth of the free space to others
    else:
      logging.warning(
          "image cache: %s's %s images (about %.1f GB decoded) fit neither the memory budget "
          "(%.1f GB, config.cache_memory_gb) nor the free disk (%.1f GB in %s); reading them "
          "uncached", split.name or "the split", key.kind, needed / 1e9, max(budget, 0) / 1e9,
          free / 1e9, folder or "no cache folder")
      return None
  if mode == "disk":
    if not path:
      raise image_cache.CacheError(
          "config.cache=disk needs a folder for the cache file: set --config.cache_dir (images "
          "held in memory, as digits and synthetic, have no data_dir)")
    if not fits_disk:
      raise image_cache.CacheError(
          f"config.cache=disk: {split.name or 'the split'}'s {key.kind} cache needs about "
          f"{needed / 1e9:.2f} GB but {folder} has {free / 1e9:.2f} GB free (or is not "
          "writable); set --config.cache_dir to a local disk with room, or use "
          "--config.cache=memory or off")
    image_cache.write_file(path, key, _decode_all(split, key, path), len(split), needed)
    return image_cache.read_file(path, key, load=False)
  # Memory: through a file when there is room for one, so that later runs reuse it.
  if path and fits_disk:
    try:
      image_cache.write_file(path, key, _decode_all(split, key, f"memory, saved to {path}"),
                             len(split), needed)
      return image_cache.read_file(path, key, load=True)
    except image_cache.CacheError as e:
      logging.warning("image cache: %s; keeping the images in memory only", e)
  return image_cache.from_arrays(_decode_all(split, key, "memory"), len(split))


def cached_images(split: Split, kind: str,
                  config: ml_collections.ConfigDict) -> image_cache.DecodedImages | None:
  """The split's decoded images for `kind` ("train" or "eval") as `config.cache` says, built
  or read once per process; None when the images go through tf.data instead."""
  mode = config.get("cache", "auto")
  if mode not in image_cache.MODES:
    raise ValueError(f"config.cache={mode!r}; use one of {', '.join(image_cache.MODES)}")
  if mode == "off" or len(split) == 0:
    return None
  key = image_cache.CacheKey(_fingerprint(split), kind, int(config.image_size))
  if (mode, key) not in split.cache:
    try:
      split.cache[(mode, key)] = _open_or_build(split, key, mode, config)
    except image_cache.CacheError as e:
      if mode != "auto":
        raise
      logging.warning("image cache: %s; reading the images uncached", e)
      split.cache[(mode, key)] = None
  return split.cache[(mode, key)]


# ---------------------------------------------------------------------------------------------
# Batches.


def _in_order(make: Callable[[int], Any], count: int, threads: int) -> Iterator[Any]:
  """make(0), ..., make(count - 1), computed by `threads` threads a few ahead, in order."""
  if threads <= 1:
    for i in range(count):
      yield make(i)
    return
  pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="hn_jax_batches")
  pending = collections.deque()
  try:
    for i in range(count):
      pending.append(pool.submit(make, i))
      if len(pending) > threads:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def train_batches(split: Split, config: ml_collections.ConfigDict, epoch: int, *,
                  process_index: int = 0, process_count: int = 1,
                  first_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """This process's share of every training batch of `epoch`, from batch `first_step` on.

  Yields {"images": uint8 (B/P, S, S, 3), "labels": int32 (B/P,), "flips": bool (B/P,)}: the
  random crops, and which of them the step mirrors left-right (`train_step.flip`).
  """
  rows = host_rows(epoch_indices(split.labels, config, epoch), config.batch_size,
                   process_index, process_count)
  num_batches, local = rows.shape
  # Position of each image in the whole run: the key of its augmentation.
  column = process_index * local + np.arange(local)
  positions = ((epoch * num_batches + np.arange(num_batches))[:, None] * config.batch_size
               + column[None, :])
  rows, positions = rows[first_step:], positions[first_step:]
  labels = np.asarray(split.labels)[rows].astype(np.int32)
  words = augment_words(config.seed, positions)
  flips = (words[..., 2] >> 31).astype(bool)
  cache = cached_images(split, "train", config)
  if cache is None:
    from hn_jax import tf_pipeline  # pylint: disable=g-import-not-at-top
    batches = tf_pipeline.train_batches(split.images, rows.reshape(-1), words.reshape(-1, 3),
                                        labels.reshape(-1), config, local)
    for b, batch in enumerate(batches):
      yield dict(batch, flips=flips[b])
    return
  size = config.image_size

  def make(b: int) -> dict[str, np.ndarray]:
    shapes = cache.shapes[rows[b]]
    tops = crop_offsets(words[b, :, 0], shapes[:, 0] - size + 1)
    lefts = crop_offsets(words[b, :, 1], shapes[:, 1] - size + 1)
    return {"images": cache.crops(rows[b], tops, lefts, size), "labels": labels[b],
            "flips": flips[b]}

  yield from _in_order(make, len(rows), CACHE_THREADS)


def eval_batches(split: Split, config: ml_collections.ConfigDict, *, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of every global eval batch, in order, the last one padded.

  Yields {"images": uint8, "labels", "mask"}; mask is False on padding. Concatenating the
  global batches and dropping the padding gives the split in its original order.
  """
  global_batch = config.eval_batch_size
  n = len(split)
  padded = -(-n // global_batch) * global_batch
  rows = host_rows(np.arange(padded), global_batch, process_index, process_count)
  mask = rows < n
  rows = np.minimum(rows, n - 1)
  labels = np.asarray(split.labels)[rows].astype(np.int32)
  cache = cached_images(split, "eval", config)
  if cache is None:
    from hn_jax import tf_pipeline  # pylint: disable=g-import-not-at-top
    yield from tf_pipeline.eval_batches(split.images, rows.reshape(-1), labels.reshape(-1),
                                        mask.reshape(-1), config, rows.shape[1])
    return

  def make(b: int) -> dict[str, np.ndarray]:
    return {"images": cache.gather(rows[b]), "labels": labels[b], "mask": mask[b]}

  yield from _in_order(make, len(rows), CACHE_THREADS)


def prefetch_to_device(batches: Iterable[dict[str, np.ndarray]], mesh,
                       size: int = 2) -> Iterator[dict[str, Any]]:
  """The batches as global arrays on `mesh`, each sent `size` batches before it is used.

  Host-to-device copies are asynchronous: while the step runs on one batch, the next
  `size` are already on their way (as uint8, a quarter of float32's bytes).
  """
  from hn_jax import sharding  # pylint: disable=g-import-not-at-top
  queue = collections.deque()
  for batch in batches:
    queue.append(sharding.global_batch(batch, mesh))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
