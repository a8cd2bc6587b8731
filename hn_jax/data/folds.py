"""Class-disjoint folds of the training classes, for choosing settings without the test split.

The protocol of Musgrave, Belongie and Lim ("A Metric Learning Reality Check", ECCV 2020):
the classes of the training split are dealt into `num_folds` groups; a run with
`config.folds = k` and `config.fold = i` trains on the training images of every group but
`i` and evaluates on the training images of group `i` (retrieval within the held-out classes,
as CUB's test). No image or label of the test split is read.

Folds depend only on the training labels, `num_folds` and `fold_seed`: every trial of a study
(whatever its loss, learning rate or run seed) sees the same folds.
"""

from __future__ import annotations

import hashlib

import numpy as np

from hn_jax.data.splits import RecordSource, Split


class FoldError(ValueError):
  """Folds that cannot be made; the message names the setting to change."""


def class_folds(labels: np.ndarray, num_folds: int, seed: int) -> list[np.ndarray]:
  """The training classes dealt into `num_folds` disjoint groups of near-equal size.

  The sorted distinct labels are shuffled by `numpy.random.default_rng(seed)` and cut into
  `num_folds` contiguous pieces (sizes differ by at most one); each group is sorted.
  """
  classes = np.unique(np.asarray(labels))
  if num_folds < 2:
    raise FoldError(f"config.folds={num_folds}: use at least 2 folds (or 0 for no validation)")
  if num_folds > len(classes):
    raise FoldError(f"config.folds={num_folds}: the training split has only {len(classes)} "
                    f"classes; use at most {len(classes)} folds")
  order = np.random.default_rng(seed).permutation(classes)
  return [np.sort(group) for group in np.array_split(order, num_folds)]


class IndexedSource(RecordSource):
  """The records of another source at `indices`, in that order."""

  def __init__(self, source: RecordSource, indices: np.ndarray):  # pylint: disable=super-init-not-called
    self.source = source
    self.indices = np.asarray(indices, np.int64)
    self.paths = source.paths

  def __len__(self) -> int:
    return len(self.indices)

  def read(self, indices) -> list[bytes]:
    return self.source.read(self.indices[np.asarray(indices, np.int64)])

  def fingerprint(self) -> str:
    return f"{self.source.fingerprint()}:{_digest(self.indices)}"


def _digest(indices: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(indices, np.int64).tobytes()).hexdigest()[:16]


def subset(split: Split, indices: np.ndarray, name: str) -> Split:
  """The images of `split` at `indices`, labels renumbered 0..C-1 in the order of the classes.

  Its fingerprint names the parent split and the indices, so its decoded-image cache is its own.
  """
  indices = np.asarray(indices, np.int64)
  _, labels = np.unique(split.labels[indices], return_inverse=True)
  if isinstance(split.images, RecordSource):
    images = IndexedSource(split.images, indices)
  else:
    images = split.images[indices]
  chains = None if split.chains is None else split.chains[indices]
  return Split(images, labels.astype(np.int64), chains, name=name,
               fingerprint=f"{split.identity}:{_digest(indices)}",
               cache_folder=split.cache_folder)


def split_train(train: Split, num_folds: int, fold: int, seed: int) -> tuple[Split, Split]:
  """(the training images of every fold but `fold`, those of `fold`): train and validation."""
  if not 0 <= fold < num_folds:
    raise FoldError(f"config.fold={fold}: use a fold in 0..{num_folds - 1}")
  held_out = np.isin(train.labels, class_folds(train.labels, num_folds, seed)[fold])
  tag = f"{train.name}-fold{fold}of{num_folds}s{seed}"
  return (subset(train, np.flatnonzero(~held_out), f"{tag}-train"),
          subset(train, np.flatnonzero(held_out), f"{tag}-val"))
