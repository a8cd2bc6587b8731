"""`hn_cars`: Cars196 from either published layout, classes 1-98 train, 99-196 test.

Two layouts exist: `cars_annos.mat` + `car_ims/` (all 16,185 images in one list), and the
devkit one (`cars_train/`, `cars_test/`, `devkit/cars_train_annos.mat`,
`cars_test_annos_withlabels.mat`). Both give the same images and classes; the
classification split they carry is ignored.
"""

from __future__ import annotations

import numpy as np
import scipy.io
from etils import epath

from hn_jax.data.tfds_builders import common

LAYOUT = ("a folder with cars_annos.mat and car_ims/, or the devkit layout: cars_train/, "
          "cars_test/, devkit/cars_train_annos.mat and cars_test_annos_withlabels.mat")
FIRST_TEST_CLASS = 99  # classes 1-98 train, 99-196 test
NUM_CLASSES = 196


def _is_root(folder: epath.Path) -> bool:
  return (folder / "cars_annos.mat").exists() or (folder / "devkit").is_dir()


def _load_mat(path: epath.Path) -> dict:
  common.require(path, LAYOUT)
  try:
    return scipy.io.loadmat(str(path), squeeze_me=True)
  except (OSError, ValueError, TypeError, NotImplementedError) as e:
    raise common.LayoutError(f"cannot read annotation file {path} ({e}); expected {LAYOUT}") from e


def _records(mat: dict, path: epath.Path, fields: tuple[str, ...]) -> np.ndarray:
  annotations = mat.get("annotations")
  names = getattr(getattr(annotations, "dtype", None), "names", None) or ()
  missing = [f for f in fields if f not in names]
  if annotations is None or missing:
    raise common.LayoutError(f"annotation file {path} has no 'annotations' struct with fields "
                      f"{', '.join(fields)}; expected {LAYOUT}")
  return np.atleast_1d(annotations)


def _class_names(mat: dict | None) -> list[str]:
  names = None if mat is None else mat.get("class_names")
  if names is None:
    return [f"class {i}" for i in range(1, NUM_CLASSES + 1)]
  return [str(n) for n in np.atleast_1d(names)]


class HnCars(common.LayoutBuilder):
  """Cars196 (Stanford Cars), split by class for retrieval."""

  name = "hn_cars"
  DESCRIPTION = "Stanford Cars196: classes 1-98 train, 99-196 test (deep metric learning)."
  HOMEPAGE = "https://ai.stanford.edu/~jkrause/cars/car_dataset.html"
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  {LAYOUT}: pass --manual_dir=<that folder>.
  """

  def _find_root(self, manual_dir: epath.Path) -> epath.Path:
    if _is_root(manual_dir):
      return manual_dir
    inside = [d for d in manual_dir.iterdir() if d.is_dir() and _is_root(d)]
    if len(inside) == 1:
      return inside[0]
    raise common.LayoutError(
        f"missing annotation file {manual_dir / 'cars_annos.mat'} (nor a devkit/ "
        f"folder); expected {LAYOUT}")

  def _list(self, root: epath.Path) -> common.Listing:
    if (root / "cars_annos.mat").exists():
      items, names = self._list_annos(root)
    else:
      items, names = self._list_devkit(root)
    listing = common.Listing(splits={"train": [], "test": []},
                             classes={"train": {}, "test": {}})
    for class_id, name in enumerate(names, 1):
      split = "train" if class_id < FIRST_TEST_CLASS else "test"
      listing.classes[split][class_id - 1] = name
    for relative, class_id, where in items:
      if not 1 <= class_id <= max(NUM_CLASSES, len(names)):
        listing.problems.append((where, f"class {class_id} out of range"))
        continue
      split = "train" if class_id < FIRST_TEST_CLASS else "test"
      listing.splits[split].append(common.Entry(path=str(root / relative), label=class_id - 1,
                                                image_id=relative))
    return listing

  def _list_annos(self, root: epath.Path):
    common.require(root / "car_ims", LAYOUT, folder=True)
    path = root / "cars_annos.mat"
    mat = _load_mat(path)
    records = _records(mat, path, ("relative_im_path", "class"))
    items = [(str(r["relative_im_path"]).strip(), int(r["class"]), f"{path}[{i}]")
             for i, r in enumerate(records)]
    return items, _class_names(mat)

  def _list_devkit(self, root: epath.Path):
    devkit = common.require(root / "devkit", LAYOUT, folder=True)
    items = []
    test_annos = root / "cars_test_annos_withlabels.mat"
    if not test_annos.exists() and (devkit / test_annos.name).exists():
      test_annos = devkit / test_annos.name
    for folder, path in (("cars_train", devkit / "cars_train_annos.mat"),
                         ("cars_test", test_annos)):
      common.require(root / folder, LAYOUT, folder=True)
      records = _records(_load_mat(path), path, ("fname", "class"))
      items += [(f"{folder}/{str(r['fname']).strip()}", int(r["class"]), f"{path}[{i}]")
                for i, r in enumerate(records)]
    meta = devkit / "cars_meta.mat"
    return items, _class_names(_load_mat(meta) if meta.exists() else None)
