"""Class-disjoint validation folds of the training split (hn_jax.data.folds)."""

import numpy as np
import pytest

from hn_jax import run_config
from hn_jax.data import datasets, folds
from hn_jax.data.splits import RecordSource, Split


@pytest.mark.parametrize("num_classes,k", [(10, 4), (7, 2), (5, 5), (100, 4)])
def test_folds_deal_every_class_once_in_near_equal_groups(num_classes, k):
  labels = np.repeat(np.arange(num_classes) * 3 + 1, 2)  # not 0..C-1: any class ids
  groups = folds.class_folds(labels, k, seed=0)
  joined = np.concatenate(groups)
  assert len(groups) == k and sorted(joined.tolist()) == sorted(set(labels.tolist()))
  assert max(map(len, groups)) - min(map(len, groups)) <= 1
  again = folds.class_folds(labels[::-1], k, seed=0)  # the order of images does not matter
  assert all(np.array_equal(a, b) for a, b in zip(groups, again))


def test_the_seed_deals_other_folds():
  labels = np.arange(40)
  a, b = folds.class_folds(labels, 4, 0), folds.class_folds(labels, 4, 1)
  assert any(not np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("k", [1, 11])
def test_impossible_folds_name_the_setting(k):
  with pytest.raises(folds.FoldError, match=f"config.folds={k}"):
    folds.class_folds(np.arange(10), k, 0)


def test_split_train_holds_out_one_fold_of_classes():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 12, size=60)
  images = rng.integers(0, 255, size=(60, 4, 4, 3), dtype=np.uint8)
  split = Split(images, labels, name="x-train")
  seen = []
  for fold in range(3):
    train, held_out = folds.split_train(split, 3, fold, seed=5)
    assert len(train) + len(held_out) == 60
    # Images are those of the parent, with labels renumbered 0..C-1 class by class.
    for part in (train, held_out):
      parent_rows = [np.flatnonzero((images == img).all(axis=(1, 2, 3)))[0] for img in part.images]
      parents = labels[parent_rows]
      assert np.array_equal(np.unique(parents)[part.labels], parents)
      assert part.labels.max() + 1 == len(np.unique(parents))
    classes = set(np.unique(labels[[np.flatnonzero((images == img).all(axis=(1, 2, 3)))[0]
                                    for img in held_out.images]]).tolist())
    seen.append(classes)
    assert held_out.identity != train.identity != split.identity
  assert set().union(*seen) == set(labels.tolist())
  assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1:])


class _Records(RecordSource):
  def __init__(self, n):  # pylint: disable=super-init-not-called
    self.paths, self.n = ["f"], n

  def __len__(self):
    return self.n

  def read(self, indices):
    return [f"record {i}".encode() for i in indices]

  def fingerprint(self):
    return "files:x"


def test_a_prepared_split_is_subset_by_index():
  split = Split(_Records(6), np.array([0, 0, 1, 1, 2, 2]), name="p-train")
  train, held_out = folds.split_train(split, 3, 0, seed=0)
  assert len(train.images) == 4 and len(held_out.images) == 2
  rows = [int(r.split()[1]) for r in held_out.images.read([0, 1])]
  assert split.labels[rows[0]] == split.labels[rows[1]]
  assert train.images.read([1]) == split.images.read([train.images.indices[1]])
  assert held_out.identity.startswith("files:x:")


def test_a_validation_run_of_digits_never_sees_the_test_split():
  config = run_config.defaults()
  config.folds, config.fold = 4, 2
  data = datasets.load(config)
  full = datasets.load(run_config.defaults())
  assert data.key == "DIGITS_VAL" and data.gallery is None and not data.train_recall
  assert len(data.train) + len(data.test) == len(full.train)
  test_pixels = {img.tobytes() for img in full.test.images}
  assert not any(img.tobytes() in test_pixels for img in data.test.images)
  assert not any(img.tobytes() in test_pixels for img in data.train.images)


@pytest.mark.parametrize("key,value,message", [("folds", 1, "config.folds=1"),
                                               ("fold", 4, "config.fold=4")])
def test_bad_fold_settings_are_one_line(key, value, message):
  config = run_config.defaults()
  config.folds = 4
  config[key] = value
  with pytest.raises(run_config.ConfigError, match=message):
    run_config.validate(config, num_devices=1, num_processes=1)
