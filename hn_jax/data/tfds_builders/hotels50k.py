"""`hn_hotels50k`: Hotels-50K from its published folder; test images query the train ones.

The image files are found by walking `images/train/` and `images/test/unoccluded/` once
(their extension is not in the CSVs, and their folder names the chain and the source),
so a training image whose download failed is simply missing: skipped and counted.
The occluded copies of the test images are not used.
"""

from __future__ import annotations

import csv
import os

from etils import epath

from hn_jax.data.tfds_builders import common

LAYOUT = ("a folder with input/dataset/hotel_info.csv, train_set.csv, test_set.csv and "
          "images/train/<chain>/<hotel>/<source>/<image_id>.<ext>, "
          "images/test/unoccluded/<chain>/<hotel>/<source>/<image_id>.<ext>")


def _read_csv(path: epath.Path, columns: tuple[str, ...],
              problems: list[tuple[str, str]]) -> list[dict[str, str]]:
  common.require(path, LAYOUT)
  rows = []
  with open(path, newline="", encoding="utf-8", errors="replace") as f:
    reader = csv.DictReader(f)
    if reader.fieldnames is None or any(c not in reader.fieldnames for c in columns):
      raise common.LayoutError(f"annotation file {path} lacks the columns {', '.join(columns)}; "
                               f"expected {LAYOUT}")
    for number, row in enumerate(reader, 2):
      if any(not (row.get(c) or "").strip() for c in columns):
        problems.append((f"{path}:{number}", "malformed line"))
        continue
      row["_where"] = f"{path}:{number}"
      rows.append(row)
  return rows


def _index_files(folder: epath.Path) -> dict[str, str]:
  """image_id (file name without extension) -> path, for every file under `folder`."""
  found = {}
  for dirpath, _, filenames in os.walk(folder):
    for name in filenames:
      found.setdefault(os.path.splitext(name)[0], os.path.join(dirpath, name))
  return found


class HnHotels50k(common.LayoutBuilder):
  """Hotels-50K: `train` is the training set and the gallery, `test` the queries."""

  name = "hn_hotels50k"
  HAS_CHAIN = True
  PAIR_SPLITS = ("train",)
  DESCRIPTION = "Hotels-50K: 50,000 hotels of 92 chains; test images query the train images."
  HOMEPAGE = "https://github.com/GWUvision/Hotels-50K"
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  {LAYOUT}: pass --manual_dir=<that folder>.
  """

  def _find_root(self, manual_dir: epath.Path) -> epath.Path:
    if not (manual_dir / "input").is_dir():
      inside = [d for d in manual_dir.iterdir() if (d / "input" / "dataset").is_dir()]
      if len(inside) == 1:
        return inside[0]
    return manual_dir

  def _list(self, root: epath.Path) -> common.Listing:
    dataset = common.require(root / "input" / "dataset", LAYOUT, folder=True)
    listing = common.Listing(splits={"train": [], "test": []},
                             classes={"train": {}, "test": {}})
    chain_of = {}
    for row in _read_csv(dataset / "hotel_info.csv", ("hotel_id", "chain_id"), listing.problems):
      try:
        chain_of[int(row["hotel_id"])] = int(row["chain_id"])
      except ValueError:
        listing.problems.append((row["_where"], "malformed line"))
    rows = {}
    for split in ("train", "test"):
      rows[split] = []
      for row in _read_csv(dataset / f"{split}_set.csv", ("image_id", "hotel_id"),
                           listing.problems):
        try:
          rows[split].append((row["image_id"].strip(), int(row["hotel_id"]),
                              (row.get("image_source") or "").strip(), row["_where"]))
        except ValueError:
          listing.problems.append((row["_where"], "malformed line"))
    folders = {"train": root / "images" / "train",
               "test": root / "images" / "test" / "unoccluded"}
    label_of = common.dense_ids(row[1] for split in rows for row in rows[split])
    for split, folder in folders.items():
      common.require(folder, LAYOUT, folder=True)
      files = _index_files(folder)
      for image_id, hotel, source, _ in rows[split]:
        chain = chain_of.get(hotel, -1)
        label = label_of[hotel]
        listing.classes[split].setdefault(label, f"hotel {hotel}")
        path = files.get(image_id)
        if path is None:  # name the file where the layout says it should be
          path = os.fspath(folder / str(chain) / str(hotel) / source / f"{image_id}.*")
        listing.splits[split].append(common.Entry(path=path, label=label, image_id=image_id,
                                                  chain=chain))
    unmatched = set(listing.classes["test"]) - set(listing.classes["train"])
    if unmatched:
      listing.warnings.append((str(dataset / "test_set.csv"),
                               f"{len(unmatched)} test hotels have no training image"))
    return listing
