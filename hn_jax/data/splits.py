"""A dataset split (its images, in memory or records of a prepared dataset, and labels) and
the dataset that holds the splits of a run."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import threading
from typing import Sequence

import numpy as np


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

  def __len__(self) -> int:
    return len(self.labels)

  @functools.cached_property
  def identity(self) -> str:
    """`fingerprint`, or a digest of the images (record files, or the in-memory pixels)."""
    if self.fingerprint:
      return self.fingerprint
    if isinstance(self.images, RecordSource):
      return self.images.fingerprint()
    return fingerprint_arrays(self.images)


def fingerprint_arrays(*arrays: np.ndarray) -> str:
  """A digest of in-memory arrays (their shapes, dtypes and bytes)."""
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(f"{a.shape}{a.dtype}".encode())
    h.update(memoryview(a).cast("B"))
  return "sha256:" + h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A dataset ready for training and evaluation.

  Queries are `test`; they are retrieved from `gallery` when there is one (In-shop: its
  gallery split; Hotels-50K: the training split), else from the rest of `test`.
  """

  key: str  # the DATA prefix of the logged scalars, e.g. "CUB"
  train: Split
  test: Split
  test_ks: tuple[int, ...]  # the K of the logged test recalls
  train_recall: bool  # whether training-set R@1 is logged
  gallery: Split | None = None
  chain_ks: tuple[int, ...] = ()  # the K of the chain recalls (Hotels-50K)
