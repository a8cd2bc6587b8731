"""Host-side batches: this process's rows of every global batch, as uint8 crops.

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
import os
from typing import Any, Callable, Iterable, Iterator

import ml_collections
import numpy as np

from hn_jax.data import image_cache, samplers
from hn_jax.data.splits import Split


# Threads that cut batches from a cache (1: the consumer's own thread). Measured on 2 shared
# cores, one thread is fastest (11,000 crops/s; two threads hand the GIL back and forth);
# hosts with more cores get up to 8 (copies release the GIL).
CACHE_THREADS = max(1, min(8, (os.cpu_count() or 1) // 2))


def cache_of(split: Split, kind: str, config: ml_collections.ConfigDict
             ) -> image_cache.DecodedImages | None:
  """The split's decoded-image cache for `kind` as the config's cache settings say (None: the
  images go through tf.data): `image_cache.cached_images` with the config's policy."""
  return image_cache.cached_images(split, kind, config.image_size,
                                   image_cache.CachePolicy.from_config(config))


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
  rows = samplers.host_rows(samplers.epoch_indices(split.labels, config, epoch),
                           config.batch_size, process_index, process_count)
  num_batches, local = rows.shape
  # Position of each image in the whole run: the key of its augmentation.
  column = process_index * local + np.arange(local)
  positions = ((epoch * num_batches + np.arange(num_batches))[:, None] * config.batch_size
               + column[None, :])
  rows, positions = rows[first_step:], positions[first_step:]
  labels = np.asarray(split.labels)[rows].astype(np.int32)
  words = samplers.augment_words(config.seed, positions)
  flips = (words[..., 2] >> 31).astype(bool)
  cache = cache_of(split, "train", config)
  if cache is None:
    from hn_jax.data import tf_pipeline  # pylint: disable=g-import-not-at-top
    batches = tf_pipeline.train_batches(split.images, rows.reshape(-1), words.reshape(-1, 3),
                                        labels.reshape(-1), config, local)
    for b, batch in enumerate(batches):
      yield dict(batch, flips=flips[b])
    return
  size = config.image_size

  def make(b: int) -> dict[str, np.ndarray]:
    shapes = cache.shapes[rows[b]]
    tops = samplers.crop_offsets(words[b, :, 0], shapes[:, 0] - size + 1)
    lefts = samplers.crop_offsets(words[b, :, 1], shapes[:, 1] - size + 1)
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
  rows = samplers.host_rows(np.arange(padded), global_batch, process_index, process_count)
  mask = rows < n
  rows = np.minimum(rows, n - 1)
  labels = np.asarray(split.labels)[rows].astype(np.int32)
  cache = cache_of(split, "eval", config)
  if cache is None:
    from hn_jax.data import tf_pipeline  # pylint: disable=g-import-not-at-top
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
