"""`hn_folder`: one's own images, from a folder per class or a CSV file, split by class.

The source (`manual_dir`, `config.folder`) is one of:

* a folder of class folders, `DIR/<class>/<image>` (images may sit deeper inside a class
  folder): the classes sorted by name, the first half for training and the rest for testing,
  as CUB's and CARS' splits (an odd count gives training the extra class);
* a folder with `train/` and `test/`, each of class folders: the split as given (a class name
  in both is one class);
* a CSV file of `path,label` or `path,label,split` rows (an optional header row starting with
  `path`), the paths relative to the CSV's folder (absolute paths and paths that climb out of
  it with `..` are refused), `split` `train` or `test`; without a split column, the classes are
  halved as above.

Classes are sorted by name (numerically when every name is an integer) and numbered from 0
over both splits; a split lists its images by class, then by path. Files whose extension is
not an image's are not listed; a listed file that cannot be read or decoded is skipped, with
its reason, as in the paper's datasets. Each split needs two classes at least. The image_id
of an example is its path relative to the source. The copy's metadata keeps a fingerprint of
the listing (paths, labels, splits, sizes, times of change), which `hn_jax.data.datasets`
compares with the source's at each use.
"""

from __future__ import annotations

import csv
import hashlib
import os

import tensorflow_datasets as tfds
from etils import epath

from hn_jax.data.tfds_builders import common

LAYOUT = ("a folder of class folders <class>/<image> (or train/<class>/<image> and "
          "test/<class>/<image>), or a CSV file of path,label[,split] rows, paths relative to it")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLITS = ("train", "test")


def _is_image(name: str) -> bool:
  return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _class_order(names) -> list[str]:
  names = set(names)
  if all(n.isdigit() for n in names):
    return sorted(names, key=lambda n: (int(n), n))
  return sorted(names)


def _images_of(folder: str) -> list[str]:
  """The image files under `folder`, at any depth, sorted; hidden folders are not entered."""
  found = []
  for parent, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    found.extend(os.path.join(parent, f) for f in files if _is_image(f))
  return sorted(found)


def _class_folders(folder: str) -> list[str]:
  return sorted(d for d in os.listdir(folder)
                if not d.startswith(".") and os.path.isdir(os.path.join(folder, d)))


def _halves(order: list[str]) -> dict[str, str]:
  """class -> split: the first half (rounded up) trains, the rest tests."""
  n_train = (len(order) + 1) // 2
  return {c: SPLITS[i >= n_train] for i, c in enumerate(order)}


def _listing(rows: list[tuple[str, str, str, str]], split_of: dict[str, str] | None,
             source: str) -> common.Listing:
  """rows of (path, image_id, class, split or "") -> the Listing; `split_of` assigns classes
  without a split of their own."""
  order = _class_order(c for _, _, c, _ in rows)
  label = {c: i for i, c in enumerate(order)}
  listing = common.Listing(splits={s: [] for s in SPLITS}, classes={s: {} for s in SPLITS})
  for path, image_id, name, split in sorted(rows, key=lambda r: (label[r[2]], r[1])):
    split = split or split_of[name]
    listing.classes[split].setdefault(label[name], name)
    listing.splits[split].append(common.Entry(path=path, label=label[name], image_id=image_id))
  for split in SPLITS:
    n = len(listing.classes[split])
    if n < 2:
      raise common.LayoutError(
          f"{source}: the {split} split has {n} class{'es' if n != 1 else ''}; each split needs "
          f"2 at least ({len(order)} classes found in all); expected {LAYOUT}")
  return listing


def list_folder(root: str) -> common.Listing:
  """The examples of a folder source (class folders, or train/ and test/ of class folders)."""
  rows = []
  split_folders = all(os.path.isdir(os.path.join(root, s)) for s in SPLITS)
  for split in (SPLITS if split_folders else ("",)):
    base = os.path.join(root, split) if split else root
    for name in _class_folders(base):
      for path in _images_of(os.path.join(base, name)):
        rows.append((path, os.path.relpath(path, root).replace(os.sep, "/"), name, split))
  if not rows:
    raise common.LayoutError(f"no image ({', '.join(IMAGE_EXTENSIONS)}) in a class folder under "
                             f"{root}; expected {LAYOUT}")
  classes = _class_order(name for _, _, name, _ in rows)
  listing = _listing(rows, None if split_folders else _halves(classes), root)
  loose = [f for f in os.listdir(root) if _is_image(f)]
  if loose:
    listing.warnings.append((root, f"{len(loose)} image(s) outside a class folder, not used"))
  return listing


def _relative(value: str, where: str) -> str:
  """A CSV path, normalized; LayoutError for one that is absolute or leaves the CSV's folder."""
  if not value:
    raise common.LayoutError(f"{where}: empty path")
  if os.path.isabs(value) or value.startswith(("/", "\\", "~")) or (len(value) > 1
                                                                     and value[1] == ":"):
    raise common.LayoutError(f"{where}: absolute path {value!r} refused; write paths relative "
                             "to the CSV file's folder")
  normal = os.path.normpath(value.replace("\\", "/"))
  if normal == ".." or normal.startswith(".." + os.sep):
    raise common.LayoutError(f"{where}: path {value!r} leaves the CSV file's folder; write paths "
                             "inside it")
  return normal


def list_csv(path: str) -> common.Listing:
  """The examples a CSV file of path,label[,split] rows lists."""
  folder = os.path.dirname(os.path.abspath(path))
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      table = [(number, row) for number, row in enumerate(csv.reader(f), 1)
               if row and any(cell.strip() for cell in row)]
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise common.LayoutError(f"cannot read {path} ({e}); expected {LAYOUT}") from e
  if table and table[0][1][0].strip().lower() == "path":
    table = table[1:]
  if not table:
    raise common.LayoutError(f"{path}: no rows; expected {LAYOUT}")
  width = len(table[0][1])
  for number, row in table:
    if len(row) not in (2, 3) or len(row) != width:
      raise common.LayoutError(f"{path}:{number}: every row must be path,label or "
                               f"path,label,split (all rows alike); got {len(row)} column(s)")
  rows = []
  for number, row in table:
    where = f"{path}:{number}"
    relative = _relative(row[0].strip(), where)
    name = row[1].strip()
    split = row[2].strip().lower() if len(row) == 3 else ""
    if not name:
      raise common.LayoutError(f"{where}: empty label")
    if len(row) == 3 and split not in SPLITS:
      raise common.LayoutError(f"{where}: split {row[2]!r} is not train or test")
    rows.append((os.path.join(folder, relative), relative.replace(os.sep, "/"), name, split))
  classes = _class_order(name for _, _, name, _ in rows)
  return _listing(rows, None if width == 3 else _halves(classes), path)


def list_source(source: str) -> common.Listing:
  """The examples of a source: a CSV file or a folder."""
  return list_csv(source) if os.path.isfile(source) else list_folder(source)


def fingerprint(listing: common.Listing) -> str:
  """A digest of what a listing names: each image's id, label, split, size and time of change."""
  h = hashlib.sha256()
  for split in SPLITS:
    for entry in listing.splits[split]:
      try:
        stat = os.stat(entry.path)
        size, mtime = stat.st_size, stat.st_mtime_ns
      except OSError:
        size = mtime = -1
      h.update(f"{split}\0{entry.image_id}\0{entry.label}\0{size}\0{mtime}\n".encode())
  return h.hexdigest()


class HnFolder(common.LayoutBuilder):
  """One's own images: a folder per class (halved, or train/ and test/) or a CSV listing."""

  name = "hn_folder"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  DESCRIPTION = "One's own images, split by class (hn_jax's folder dataset)."
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  {LAYOUT}: pass --manual_dir=<that folder or CSV file>.
  """

  def _find_root(self, manual_dir: epath.Path) -> epath.Path:
    return manual_dir

  def _list(self, root: epath.Path) -> common.Listing:
    return list_source(os.fspath(root))

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    generators = super()._split_generators(dl_manager)
    # What the copy was made of, so that a later run can tell that the source has changed.
    self.info.metadata["listing"] = {"fingerprint": fingerprint(self._listing),
                                     "images": sum(map(len, self._listing.splits.values()))}
    return generators
