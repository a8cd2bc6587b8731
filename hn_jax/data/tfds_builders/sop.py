"""`hn_sop`: Stanford Online Products from its published folder, split as given."""

from __future__ import annotations

from etils import epath

from hn_jax.data.tfds_builders import common

LAYOUT = ("the folder Stanford_Online_Products/ with Ebay_train.txt, Ebay_test.txt "
          "(image_id class_id super_class_id path) and the <category>_final/ image folders")


class HnSop(common.LayoutBuilder):
  """Stanford Online Products: Ebay_train.txt is the train split, Ebay_test.txt the test."""

  name = "hn_sop"
  DESCRIPTION = "Stanford Online Products: 11,318 train and 11,316 test classes."
  HOMEPAGE = "https://cvgl.stanford.edu/projects/lifted_struct/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  {LAYOUT}: pass --manual_dir=<that folder> (or the folder holding it).
  """

  def _find_root(self, manual_dir: epath.Path) -> epath.Path:
    inside = manual_dir / "Stanford_Online_Products"
    if inside.is_dir() and not (manual_dir / "Ebay_train.txt").exists():
      return inside
    return manual_dir

  def _list(self, root: epath.Path) -> common.Listing:
    listing = common.Listing(splits={"train": [], "test": []},
                             classes={"train": {}, "test": {}})
    for split in ("train", "test"):
      path = root / f"Ebay_{split}.txt"
      lines = common.read_lines(path, LAYOUT)
      for number, line in enumerate(lines[1:], 2):  # the first line is the header
        parts = line.split()
        if not parts:
          continue
        if len(parts) != 4 or not parts[1].isdigit():
          listing.problems.append((f"{path}:{number}", "malformed line"))
          continue
        image_id, class_id, _, relative = parts
        label = int(class_id) - 1
        listing.classes[split].setdefault(label, f"{path} class {class_id}")
        listing.splits[split].append(common.Entry(path=str(root / relative), label=label,
                                                  image_id=image_id))
    shared = set(listing.classes["train"]) & set(listing.classes["test"])
    if shared:
      listing.warnings.append((str(root), f"{len(shared)} classes are in both Ebay_train.txt "
                               "and Ebay_test.txt"))
    return listing
