"""`hn_cub`: CUB-200-2011 from its published folder, classes 1-100 train, 101-200 test."""

from __future__ import annotations

from etils import epath

from hn_jax.data.tfds_builders import common

LAYOUT = ("the folder CUB_200_2011/ with images.txt, image_class_labels.txt, classes.txt and "
          "images/<class folder>/<file>.jpg")
FIRST_TEST_CLASS = 101  # classes 1-100 train, 101-200 test (docs/datasets.md)


class HnCub(common.LayoutBuilder):
  """CUB-200-2011, split by class for retrieval (the classification split is ignored)."""

  name = "hn_cub"
  DESCRIPTION = "CUB-200-2011 birds: classes 1-100 train, 101-200 test (deep metric learning)."
  HOMEPAGE = "https://www.vision.caltech.edu/datasets/cub_200_2011/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  {LAYOUT}: pass --manual_dir=<that folder> (or the folder holding it).
  """

  def _find_root(self, manual_dir: epath.Path) -> epath.Path:
    if (manual_dir / "CUB_200_2011").is_dir() and not (manual_dir / "images.txt").exists():
      return manual_dir / "CUB_200_2011"
    return manual_dir

  def _list(self, root: epath.Path) -> common.Listing:
    common.require(root / "images", LAYOUT, folder=True)
    listing = common.Listing(splits={"train": [], "test": []},
                             classes={"train": {}, "test": {}})
    class_names = {}
    for number, line in enumerate(common.read_lines(root / "classes.txt", LAYOUT), 1):
      parts = line.split(maxsplit=1)
      if not parts:
        continue
      if len(parts) != 2 or not parts[0].isdigit():
        listing.problems.append((f"{root / 'classes.txt'}:{number}", "malformed line"))
        continue
      class_names[int(parts[0])] = parts[1].strip()
    class_of = {}
    path = root / "image_class_labels.txt"
    for number, line in enumerate(common.read_lines(path, LAYOUT), 1):
      parts = line.split()
      if not parts:
        continue
      if len(parts) != 2 or not all(p.isdigit() for p in parts):
        listing.problems.append((f"{path}:{number}", "malformed line"))
        continue
      class_of[parts[0]] = int(parts[1])
    for class_id, class_name in class_names.items():
      split = "train" if class_id < FIRST_TEST_CLASS else "test"
      listing.classes[split][class_id - 1] = str(root / "images" / class_name)
    path = root / "images.txt"
    for number, line in enumerate(common.read_lines(path, LAYOUT), 1):
      parts = line.split(maxsplit=1)
      if not parts:
        continue
      if len(parts) != 2:
        listing.problems.append((f"{path}:{number}", "malformed line"))
        continue
      image_id, relative = parts[0], parts[1].strip()
      if image_id not in class_of:
        listing.problems.append((f"{path}:{number}", f"image {image_id} has no class in "
                                 "image_class_labels.txt"))
        continue
      class_id = class_of[image_id]
      split = "train" if class_id < FIRST_TEST_CLASS else "test"
      listing.classes[split].setdefault(class_id - 1, str(root / "images" / relative.split("/")[0]))
      listing.splits[split].append(common.Entry(path=str(root / "images" / relative),
                                                label=class_id - 1, image_id=image_id))
    return listing
