"""Datasets by name: their splits, logging key and evaluation protocol (docs/protocol.md section 6).

- `digits`, `synthetic`: no download, held in memory (`in_memory`).
- `folder`: one's own images (`config.folder`: class folders or a CSV file), prepared like the
  benchmarks, automatically on first use, under `folder_dir` (docs/folder.md).
- `cub`, `cars`, `sop`, `inshop`, `hotels50k`: the paper's benchmarks, prepared once by
  `python -m hn_jax.tools.prepare` (TFDS builders in `hn_jax/data/tfds_builders/`) under
  `config.data_dir` or the `HN_DATA_DIR` environment variable, and read by index from their
  ArrayRecord files; labels (and Hotels-50K chains) come from the dataset's metadata, so
  loading reads no image.

A `Dataset` says what its evaluation retrieves (`hn_jax.evaluators` runs it): CUB, CARS and
SOP retrieve within the test split (the query left out) and also report training-set R@1; In-shop retrieves the query split from the gallery split;
Hotels-50K retrieves the test images (queries) from the training images (gallery), by
hotel (instance) and by chain (`{KEY}_test_chain_R_{K}`, over queries of a known chain).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging as std_logging
import os
import re
import shutil

import ml_collections
import numpy as np
from absl import logging

from hn_jax.data import folds
from hn_jax.data.splits import Dataset, RecordSource, Split  # noqa: F401  (Dataset: its home)

IN_MEMORY = ("digits", "synthetic")
PREPARED = ("cub", "cars", "sop", "inshop", "hotels50k")
FOLDER = "folder"  # one's own images (config.folder), prepared on first use (docs/folder.md)
DATASET_NAMES = IN_MEMORY + PREPARED + (FOLDER,)
# The DATA prefix of the logged scalars (docs/protocol.md section 7) and the K of the test recalls.
KEYS = {"digits": "DIGITS", "synthetic": "SYNTHETIC", "cub": "CUB", "cars": "CAR", "sop": "SOP",
        "inshop": "ICR", "hotels50k": "HOTEL", FOLDER: "FOLDER"}
TEST_KS = {"cub": (1, 2, 4, 8), "cars": (1, 2, 4, 8), "sop": (1, 10, 100, 1000),
           "inshop": (1, 10, 20, 30), "hotels50k": (1, 10, 100), FOLDER: (1, 2, 4, 8)}
CHAIN_KS = (1, 3, 5)  # Hotels-50K chain recall
DATA_DIR_ENV = "HN_DATA_DIR"
CACHE_FOLDER = "image_cache"  # under the data_dir: decoded-image caches of prepared datasets


class DataNotPreparedError(ValueError):
  """The dataset is not prepared where the config points; the message says how to prepare it."""


# The folder each dataset's published layout is usually unpacked to (for the commands we print).
_LAYOUT_FOLDERS = {"cub": "CUB_200_2011", "cars": "cars196", "sop": "Stanford_Online_Products",
                   "inshop": "inshop", "hotels50k": "hotels50k"}


def prepare_command(dataset: str, data_dir: str | None = None) -> str:
  """The command line that prepares `dataset` (for error messages)."""
  folder = _LAYOUT_FOLDERS.get(dataset, dataset)
  return (f"python -m hn_jax.tools.prepare --dataset={dataset} --manual_dir=/path/to/{folder} "
          f"--data_dir={data_dir or '/path/to/prepared'}")


def how_to_prepare(dataset: str, data_dir: str | None = None) -> str:
  """Where to get a paper dataset, what its folder holds and the command that prepares it."""
  import sys  # pylint: disable=g-import-not-at-top
  from hn_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
  builder = tfds_builders.BUILDERS[dataset]
  layout = getattr(sys.modules[builder.__module__], "LAYOUT", "")
  where = f"download it from {builder.HOMEPAGE} ; unpacked, it is" if builder.HOMEPAGE else "it is"
  return (f"{where} {layout} (docs/datasets.md); then prepare it with: "
          f"{prepare_command(dataset, data_dir)}")


def data_dir(config: ml_collections.ConfigDict) -> str:
  """Where prepared datasets live: config.data_dir, else $HN_DATA_DIR ("" if neither)."""
  return config.get("data_dir", "") or os.environ.get(DATA_DIR_ENV, "")


def folder_root(data_dir_: str) -> str:
  """Where prepared folders live: `data_dir_` (the config's or $HN_DATA_DIR), else
  `$XDG_CACHE_HOME/hn_jax/datasets` (default `~/.cache/hn_jax/datasets`)."""
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return data_dir_ or os.path.join(cache, "hn_jax", "datasets")


def folder_dir(root: str, source: str) -> str:
  """The prepared copy of the folder (or CSV file) `source` under `root`: one per source path,
  `<root>/folders/<its name>-<digest of its absolute path>`."""
  source = os.path.abspath(os.path.expanduser(source)).rstrip(os.sep) or os.sep
  name = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(source))[:40] or "root"
  return os.path.join(root, "folders",
                      f"{name}-{hashlib.sha256(source.encode()).hexdigest()[:12]}")


def prepared_root(config: ml_collections.ConfigDict) -> str:
  """The data_dir the builder of `config.dataset` reads (for a folder: its own)."""
  if config.dataset == FOLDER:
    return folder_dir(folder_root(data_dir(config)), config.folder)
  return data_dir(config)


@contextlib.contextmanager
def _quiet_tfds():
  """Without TFDS's INFO and WARNING lines (e.g. "Variant folder ... has no dataset_info.json"
  for a dataset not prepared) and its printed "Downloading and preparing ..." line."""
  absl_logger = logging.get_absl_logger()
  level = absl_logger.level
  absl_logger.setLevel(std_logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    absl_logger.setLevel(level)


def _check_unchanged(source: str, version_dir: str, config: ml_collections.ConfigDict) -> None:
  """One warning line when the folder no longer lists what its prepared copy was made of."""
  from hn_jax.data.tfds_builders import folder  # pylint: disable=g-import-not-at-top
  try:
    with open(os.path.join(version_dir, "metadata.json")) as f:
      then = json.load(f).get("listing", {})
  except (OSError, ValueError):  # an unreadable copy fails later, with its own message
    return
  try:
    now = folder.list_source(source)
    count = (f"it lists {sum(map(len, now.splits.values()))} images, the copy has "
             f"{then.get('images')}")
    changed = folder.fingerprint(now) != then.get("fingerprint")
  except (OSError, ValueError) as e:  # gone, or no longer a layout (LayoutError)
    count, changed = f"it cannot be listed: {e}", True
  if changed:
    logging.warning("config.folder=%s has changed since it was prepared (%s); this run uses the "
                    "prepared copy; to use the folder as it is now: python -m hn_jax.tools.prepare "
                    "--dataset=folder --manual_dir=%s --data_dir=%s --overwrite", source, count,
                    source, folder_root(data_dir(config)))


def _prepare_folder(config: ml_collections.ConfigDict) -> str:
  """The folder's prepared copy; prepared now if it is not yet (one line says so)."""
  from hn_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
  from hn_jax.tools import prepare  # pylint: disable=g-import-not-at-top

  source = os.path.expanduser(config.get("folder", ""))
  if not source:
    raise DataNotPreparedError("config.dataset='folder' needs --config.folder=DIR (class "
                               "folders of images) or =FILE.csv (path,label[,split] rows); see "
                               "docs/folder.md")
  root = prepared_root(config)
  info = os.path.join(root, tfds_builders.HnFolder.name, str(tfds_builders.HnFolder.VERSION),
                      "dataset_info.json")
  if os.path.isfile(info):  # prepared (asking the builder logs a warning when it is not)
    _check_unchanged(source, os.path.dirname(info), config)
    return root
  if not os.path.exists(source):
    raise DataNotPreparedError(f"config.folder={source}: no such folder or file")
  logging.info("config.folder=%s: preparing it once into %s (later runs reuse it; after "
               "changing its images: python -m hn_jax.tools.prepare --dataset=folder "
               "--manual_dir=%s --data_dir=%s --overwrite)", source, root, source,
               folder_root(data_dir(config)))
  existed = os.path.exists(root)
  try:
    with _quiet_tfds():  # the summary line follows
      builder = prepare.prepare(FOLDER, source, folder_root(data_dir(config)), progress=False)
  except (tfds_builders.LayoutError, prepare.PrepareError) as e:
    if not existed:  # TFDS's empty folders: leave nothing behind
      shutil.rmtree(root, ignore_errors=True)
    raise DataNotPreparedError(f"config.folder={source}: {e}") from None
  logging.info("%s", prepare.one_line(builder))
  return root


def _prepared(name: str, config: ml_collections.ConfigDict) -> Dataset:
  from hn_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top

  root = _prepare_folder(config) if name == FOLDER else data_dir(config)
  if not root:
    raise DataNotPreparedError(
        f"config.dataset={name!r} needs prepared data: set --config.data_dir or {DATA_DIR_ENV} "
        f"to where it was prepared, or {how_to_prepare(name)}")
  with _quiet_tfds():
    builder = tfds_builders.BUILDERS[name](data_dir=root)
    prepared = builder.is_prepared()
  if not prepared:
    folder = os.path.dirname(builder.data_dir)
    older = sorted(v for v in (os.listdir(folder) if os.path.isdir(folder) else [])
                   if v != str(builder.version) and v[:1].isdigit())
    also = (f" (the copy there is of version {', '.join(older)}; this hn_jax reads "
            f"{builder.version}: {builder.RELEASE_NOTES[str(builder.version)]})" if older else "")
    raise DataNotPreparedError(f"dataset {name} is not prepared in {root}{also}; "
                               f"{how_to_prepare(name, root)}")
  info = builder.info
  if info.file_format is None or info.file_format.value != "array_record":
    raise DataNotPreparedError(f"dataset {name} in {builder.data_dir} is not in ArrayRecord "
                               f"files; prepare it again with: {prepare_command(name, root)} "
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
  """The dataset `config.dataset` names; DataNotPreparedError if it is not prepared.

  With `config.folds` set, its training split held out by class folds (`validation`).
  """
  if config.dataset in IN_MEMORY:
    from hn_jax.data import in_memory  # pylint: disable=g-import-not-at-top
    data = in_memory.digits() if config.dataset == "digits" else in_memory.synthetic(config)
  elif config.dataset in PREPARED or config.dataset == FOLDER:
    data = _prepared(config.dataset, config)
  else:
    raise ValueError(f"unknown dataset {config.dataset!r}; choose one of "
                     f"{', '.join(DATASET_NAMES)}")
  if config.get("folds", 0):
    return validation(data, config.folds, config.get("fold", 0), config.get("fold_seed", 0))
  return data


VALIDATION_SUFFIX = "_VAL"  # of the DATA prefix of a run evaluated on held-out training classes


def validation(data: Dataset, num_folds: int, fold: int, seed: int) -> Dataset:
  """`data` for a run that trains on all class folds of its training split but `fold` and
  evaluates on `fold` (hn_jax.data.folds); its scalars read `{KEY}_VAL_test_...`."""
  train, held_out = folds.split_train(data.train, num_folds, fold, seed)
  return Dataset(key=data.key + VALIDATION_SUFFIX, train=train, test=held_out,
                 test_ks=data.test_ks, train_recall=False)
