"""Datasets by name: their splits, logging key and evaluation protocol (PROTOCOL section 6).

`digits` is the embedded default: scikit-learn's 1,797 handwritten 8x8 digits (shipped
inside scikit-learn, no download), classes 0-4 for training and 5-9 for testing, so that
train and test classes are disjoint as in every benchmark of the paper.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import ml_collections
import numpy as np

from hn_jax import evaluation
from hn_jax.input_pipeline import Split

DATASET_NAMES = ("digits",)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A dataset ready for training and evaluation."""

  key: str  # the DATA prefix of the logged scalars, e.g. "CUB"
  train: Split
  test: Split
  test_ks: tuple[int, ...]  # the K of the logged test recalls
  train_recall: bool  # whether training-set R@1 is logged

  def evaluate(self, embed: Callable[[Split], np.ndarray]) -> dict[str, float]:
    """The logged metrics (PROTOCOL section 7) of the embedding function `embed`."""
    metrics = {}
    test = embed(self.test)
    for k, r in evaluation.recall_at_k(test, self.test.labels, self.test_ks).items():
      metrics[f"{self.key}_test_R_{k}"] = r
    if self.train_recall:
      train = embed(self.train)
      metrics[f"{self.key}_train_R_1"] = evaluation.recall_at_k(train, self.train.labels, [1])[1]
    return metrics


def _digits() -> Dataset:
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  images = np.repeat(images[..., None], 3, axis=-1)
  labels = digits.target.astype(np.int64)
  is_train = labels < 5
  return Dataset(key="DIGITS", train=Split(images[is_train], labels[is_train]),
                 test=Split(images[~is_train], labels[~is_train]), test_ks=(1, 2, 4, 8),
                 train_recall=True)


def load(config: ml_collections.ConfigDict) -> Dataset:
  """The dataset `config.dataset` names."""
  if config.dataset == "digits":
    return _digits()
  raise ValueError(f"unknown dataset {config.dataset!r}; choose one of {', '.join(DATASET_NAMES)}")
