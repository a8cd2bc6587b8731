"""Datasets by name: their splits, logging key and evaluation protocol (docs/protocol.md section 6).

- `digits`: the embedded default, scikit-learn's 1,797 handwritten 8x8 digits (shipped inside
  scikit-learn, no download), classes 0-4 for training and 5-9 for testing, so that train
  and test classes are disjoint as in every benchmark of the paper.
- `synthetic`: procedural images generated in memory (see `synthetic_images`), for tests of
  learning and for throughput benchmarks.
- `cub`, `cars`, `sop`, `inshop`, `hotels50k`: the paper's benchmarks, prepared once by
  `python -m hn_jax.prepare` (TFDS builders in `hn_jax/tfds_builders/`) under
  `config.data_dir` or the `HN_DATA_DIR` environment variable, and read by index from their
  ArrayRecord files; labels (and Hotels-50K chains) come from the dataset's metadata, so
  loading reads no image.

Evaluation: CUB, CARS and SOP retrieve within the test split (the query left out) and also
report training-set R@1; In-shop retrieves the query split from the gallery split;
Hotels-50K retrieves the test images (queries) from the training images (gallery), by
hotel (instance) and by chain (`{KEY}_test_chain_R_{K}`, over queries of a known chain).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Callable

import ml_collections
import numpy as np

from jax.sharding import Mesh

from hn_jax import evaluation
from hn_jax.input_pipeline import RecordSource, Split

PREPARED = ("cub", "cars", "sop", "inshop", "hotels50k")
DATASET_NAMES = ("digits", "synthetic") + PREPARED
# The DATA prefix of the logged scalars (docs/protocol.md section 7) and the K of the test recalls.
KEYS = {"digits": "DIGITS", "synthetic": "SYNTHETIC", "cub": "CUB", "cars": "CAR", "sop": "SOP",
        "inshop": "ICR", "hotels50k": "HOTEL"}
TEST_KS = {"cub": (1, 2, 4, 8), "cars": (1, 2, 4, 8), "sop": (1, 10, 100, 1000),
           "inshop": (1, 10, 20, 30), "hotels50k": (1, 10, 100)}
CHAIN_KS = (1, 3, 5)  # Hotels-50K chain recall
NEIGHBOURS = 100  # nearest gallery indices kept per query at each evaluation (Hotels-50K)
DATA_DIR_ENV = "HN_DATA_DIR"
CACHE_FOLDER = "image_cache"  # under the data_dir: decoded-image caches of prepared datasets


class DataNotPreparedError(ValueError):
  """The dataset is not prepared where the config points; the message says how to prepare it."""


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

  def evaluate(self, embed: Callable[[Split], np.ndarray],
               save_neighbours: Callable[[np.ndarray], None] | None = None, *,
               max_bytes: int = evaluation.DEFAULT_MAX_BYTES,
               mesh: Mesh | None = None) -> dict[str, float]:
    """The logged metrics (docs/protocol.md section 7) of the embedding function `embed`.

    Recall@K, MAP@R and R-Precision of the test queries (against the gallery where the
    dataset has one), chain recall for Hotels-50K, and training-set R@1 where the protocol
    logs it. For a dataset with chains, each query's `NEIGHBOURS` nearest gallery indices are
    handed to `save_neighbours` (the release kept them on disk for later analysis).
    `max_bytes` and `mesh` bound and place the ranking (see `evaluation.recall_at_k`).
    """
    metrics = {}
    embedded = {}

    def embedding(split: Split) -> np.ndarray:
      if id(split) not in embedded:
        embedded[id(split)] = embed(split)
      return embedded[id(split)]

    test = embedding(self.test)
    gallery = None if self.gallery is None else embedding(self.gallery)
    gallery_labels = None if self.gallery is None else self.gallery.labels
    budget = {"max_bytes": max_bytes, "mesh": mesh}
    recalls = evaluation.recall_at_k(test, self.test.labels, self.test_ks, gallery,
                                     gallery_labels, **budget)
    for k, r in recalls.items():
      metrics[f"{self.key}_test_R_{k}"] = r
    precision = evaluation.map_at_r(test, self.test.labels, gallery, gallery_labels, **budget)
    metrics[f"{self.key}_test_MAP_R"] = precision["MAP_R"]
    metrics[f"{self.key}_test_RP"] = precision["RP"]
    if self.chain_ks:
      top = evaluation.top_k_indices(test, gallery, min(NEIGHBOURS, len(gallery)), **budget)
      if save_neighbours is not None:
        save_neighbours(top)
      ks = [min(k, top.shape[1]) for k in self.chain_ks]
      chains = evaluation.chain_recall(top, self.test.chains, self.gallery.chains, ks)
      for k, kk in zip(self.chain_ks, ks):
        metrics[f"{self.key}_test_chain_R_{k}"] = chains[kk]
    if self.train_recall:
      train = embedding(self.train)
      metrics[f"{self.key}_train_R_1"] = evaluation.recall_at_k(train, self.train.labels, [1],
                                                                **budget)[1]
    return metrics


def _digits() -> Dataset:
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  images = np.repeat(images[..., None], 3, axis=-1)
  labels = digits.target.astype(np.int64)
  is_train = labels < 5
  return Dataset(key="DIGITS",
                 train=Split(images[is_train], labels[is_train], name="digits-train"),
                 test=Split(images[~is_train], labels[~is_train], name="digits-test"),
                 test_ks=(1, 2, 4, 8),
                 train_recall=True)


# ---------------------------------------------------------------------------------------------
# synthetic


def _soft_boxes(t: np.ndarray, cell: np.ndarray, count: int) -> np.ndarray:
  """(B, S, count): how much pixel s lies in the glyph's cell row (or column) r."""
  r = np.arange(count, dtype=np.float32)
  inside = np.minimum(t[:, :, None] - r, r + 1 - t[:, :, None]) * cell[:, None, None]
  return np.clip(inside + 0.5, 0.0, 1.0)  # anti-aliased edges, one pixel wide


CELL_MIN, CELL_MAX = 0.14, 0.18  # a glyph cell's side, as a fraction of the image's
LIGHT = 0.0  # strongest change of lighting across an image (more: harder for pixels and CNNs)

@functools.lru_cache(maxsize=4)
def synthetic_images(num_classes: int = 200, images_per_class: int = 10, size: int = 32,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Procedural glyphs: uint8 images (N, size, size, 3) and labels (N,), class-major.

  A class is a random 5 x 5 binary glyph, left-right symmetric (so the flip augmentation
  keeps the class). Each image draws it at a random scale and position, dark on a light
  background, both colors at random, with pixel noise (and, with LIGHT > 0, uneven
  lighting). Measured at size 32: raw pixels reach test R@1 0.46 on the default 100 test
  classes of 10 images (chance 0.01), so pixels alone are far from solving it; a small
  ResNet trained from scratch gains more than 0.2 test R@1 in 3 epochs on 25 training
  classes (tests/test_datasets_synthetic.py). Stronger nuisances (smaller glyphs, random
  contrast polarity, LIGHT = 0.4) bring raw pixels down to 0.16 but also slow learning
  beyond what a one-minute test can show.
  """
  rng = np.random.default_rng(seed)
  seen, glyphs = set(), []
  while len(glyphs) < num_classes:
    half = rng.random((5, 3)) < 0.5
    if half.sum() < 4 or half.tobytes() in seen:
      continue
    seen.add(half.tobytes())
    glyphs.append(np.concatenate([half, half[:, 1::-1]], axis=1))
  glyphs = np.asarray(glyphs, np.float32)
  labels = np.repeat(np.arange(num_classes, dtype=np.int64), images_per_class)
  n = len(labels)
  cell = (size * rng.uniform(CELL_MIN, CELL_MAX, n)).astype(np.float32)
  origin = (rng.random((n, 2)) * (size - 5 * cell[:, None])).astype(np.float32)
  # Light backgrounds, dark glyphs, colors at random.
  background = rng.uniform(0.45, 1.0, (n, 3)).astype(np.float32)
  foreground = rng.uniform(0.0, 0.55, (n, 3)).astype(np.float32)
  angle = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
  light = rng.uniform(0.5 * LIGHT, LIGHT, n).astype(np.float32)
  images = np.empty((n, size, size, 3), np.uint8)
  centers = np.arange(size, dtype=np.float32) + 0.5
  for start in range(0, n, 256):
    b = slice(start, min(n, start + 256))
    rows = _soft_boxes((centers[None] - origin[b, 1:2]) / cell[b, None], cell[b], 5)
    cols = _soft_boxes((centers[None] - origin[b, 0:1]) / cell[b, None], cell[b], 5)
    mask = np.matmul(np.matmul(rows, glyphs[labels[b]]), cols.transpose(0, 2, 1))
    image = (foreground - background)[b, None, None] * (255 * mask[..., None])
    image += background[b, None, None] * 255
    # Uneven lighting: a random linear ramp multiplies every pixel by 1 -+ up to LIGHT.
    ramp = (np.cos(angle[b, None, None]) * centers[None, None, :]
            + np.sin(angle[b, None, None]) * centers[None, :, None]) / size - 0.5 * (
                np.cos(angle[b, None, None]) + np.sin(angle[b, None, None]))
    image *= (1 + 2 * light[b, None, None, None] * ramp[..., None])
    image += 0.5
    image += rng.integers(-26, 27, image.shape, dtype=np.int8)  # noise of std 15 (0.06)
    images[b] = np.clip(image, 0, 255, out=image)
  return images, labels


def _synthetic(config: ml_collections.ConfigDict) -> Dataset:
  num_classes = config.get("synthetic_classes", 200)
  images, labels = synthetic_images(num_classes, config.get("synthetic_images_per_class", 10),
                                    config.image_size)
  is_train = labels < num_classes // 2
  return Dataset(key="SYNTHETIC",
                 train=Split(images[is_train], labels[is_train], name="synthetic-train"),
                 test=Split(images[~is_train], labels[~is_train], name="synthetic-test"),
                 test_ks=(1, 2, 4, 8),
                 train_recall=True)


# ---------------------------------------------------------------------------------------------
# prepared datasets


def data_dir(config: ml_collections.ConfigDict) -> str:
  """Where prepared datasets live: config.data_dir, else $HN_DATA_DIR ("" if neither)."""
  return config.get("data_dir", "") or os.environ.get(DATA_DIR_ENV, "")


def _prepared(name: str, config: ml_collections.ConfigDict) -> Dataset:
  from hn_jax import prepare, tfds_builders  # pylint: disable=g-import-not-at-top

  root = data_dir(config)
  if not root:
    raise DataNotPreparedError(
        f"config.dataset={name!r} needs prepared data: set --config.data_dir or {DATA_DIR_ENV} "
        f"to where it was prepared, or prepare it with: {prepare.command(name)}")
  builder = tfds_builders.BUILDERS[name](data_dir=root)
  if not builder.is_prepared():
    folder = os.path.dirname(builder.data_dir)
    older = sorted(v for v in (os.listdir(folder) if os.path.isdir(folder) else [])
                   if v != str(builder.version) and v[:1].isdigit())
    also = (f" (the copy there is of version {', '.join(older)}; this hn_jax reads "
            f"{builder.version}: {builder.RELEASE_NOTES[str(builder.version)]})" if older else "")
    raise DataNotPreparedError(f"dataset {name} is not prepared in {root}{also}; prepare it "
                               f"with: {prepare.command(name, root)}")
  info = builder.info
  if info.file_format is None or info.file_format.value != "array_record":
    raise DataNotPreparedError(f"dataset {name} in {builder.data_dir} is not in ArrayRecord "
                               f"files; prepare it again with: {prepare.command(name, root)} "
                               "--overwrite")
  tables = info.metadata["splits"]

  def split(split_name: str) -> Split:
    table = tables[split_name]
    source = RecordSource([os.fspath(p) for p in info.splits[split_name].filepaths],
                          num_records=len(table["labels"]))
    chains = np.asarray(table["chains"], np.int64) if "chains" in table else None
    # The decoded-image cache is keyed by the record files and what the metadata says of them.
    described = json.dumps([name, str(info.version), table.get("image_ids"), table["labels"]])
    fingerprint = (f"{source.fingerprint()}:"
                   f"{hashlib.sha256(described.encode()).hexdigest()[:16]}")
    return Split(source, np.asarray(table["labels"], np.int64), chains,
                 name=f"{name}-{split_name}", fingerprint=fingerprint,
                 cache_folder=os.path.join(root, CACHE_FOLDER))

  key, ks = KEYS[name], TEST_KS[name]
  if name == "inshop":
    return Dataset(key=key, train=split("train"), test=split("query"), test_ks=ks,
                   train_recall=False, gallery=split("gallery"))
  if name == "hotels50k":
    train = split("train")
    return Dataset(key=key, train=train, test=split("test"), test_ks=ks, train_recall=False,
                   gallery=train, chain_ks=CHAIN_KS)
  return Dataset(key=key, train=split("train"), test=split("test"), test_ks=ks,
                 train_recall=True)


def load(config: ml_collections.ConfigDict) -> Dataset:
  """The dataset `config.dataset` names; DataNotPreparedError if it is not prepared."""
  if config.dataset == "digits":
    return _digits()
  if config.dataset == "synthetic":
    return _synthetic(config)
  if config.dataset in PREPARED:
    return _prepared(config.dataset, config)
  raise ValueError(f"unknown dataset {config.dataset!r}; choose one of {', '.join(DATASET_NAMES)}")
