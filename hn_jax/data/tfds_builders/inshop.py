"""`hn_inshop`: In-shop Clothes Retrieval from its published folder: train, query, gallery."""

from __future__ import annotations

from etils import epath

from hn_jax.data.tfds_builders import common

LAYOUT = ("a folder with Eval/list_eval_partition.txt (image_name item_id evaluation_status) "
          "and img/")
SPLITS = ("train", "query", "gallery")


class HnInshop(common.LayoutBuilder):
  """DeepFashion In-shop: train items; query and gallery images of the other items."""

  name = "hn_inshop"
  SPLIT_NAMES = SPLITS
  DESCRIPTION = "DeepFashion In-shop Clothes Retrieval: 3,997 train items, 3,985 test items."
  HOMEPAGE = "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html"
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  {LAYOUT}: pass --manual_dir=<that folder>.
  """

  def _find_root(self, manual_dir: epath.Path) -> epath.Path:
    if not (manual_dir / "Eval").is_dir():
      inside = [d for d in manual_dir.iterdir() if (d / "Eval").is_dir()]
      if len(inside) == 1:
        return inside[0]
    return manual_dir

  def _list(self, root: epath.Path) -> common.Listing:
    path = root / "Eval" / "list_eval_partition.txt"
    common.require(root / "Eval", LAYOUT, folder=True)
    lines = common.read_lines(path, LAYOUT)
    common.require(root / "img", LAYOUT, folder=True)
    listing = common.Listing(splits={s: [] for s in SPLITS}, classes={s: {} for s in SPLITS})
    rows = []
    for number, line in enumerate(lines[2:], 3):  # a count, then the header
      parts = line.split()
      if not parts:
        continue
      if len(parts) != 3 or parts[2] not in SPLITS:
        listing.problems.append((f"{path}:{number}", "malformed line"))
        continue
      rows.append(parts)
    label_of = common.dense_ids(item for _, item, _ in rows)
    for relative, item, split in rows:
      label = label_of[item]
      listing.classes[split].setdefault(label, item)
      listing.splits[split].append(common.Entry(path=str(root / relative), label=label,
                                                image_id=relative))
    shared = set(listing.classes["train"]) & (set(listing.classes["query"])
                                              | set(listing.classes["gallery"]))
    if shared:
      listing.warnings.append((str(path), f"{len(shared)} items are in train and in "
                               "query/gallery"))
    missing = set(listing.classes["query"]) - set(listing.classes["gallery"])
    if missing:
      listing.warnings.append((str(path), f"{len(missing)} query items have no gallery image"))
    return listing
