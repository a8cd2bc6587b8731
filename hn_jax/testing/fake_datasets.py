"""Tiny copies of the five published layouts, with the damage real copies have.

Each `write_*` function writes a few dozen small real image files (PIL) and annotation
files in the exact published format into a folder, and returns what a correct build must
produce. Every copy holds a missing file, a truncated JPEG, a file that is not an image, a
grayscale and a CMYK JPEG, an RGB PNG (one with alpha too), a class with a single image and an empty class. Tests use
them; so can anyone who wants to try `python -m hn_jax.tools.prepare` without the real data.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from typing import Callable

import numpy as np
import scipy.io
from PIL import Image

# Kinds of file: written as a sound image unless named in UNSOUND (reason a build gives).
UNSOUND = {"missing": "missing file", "truncated": "truncated image",
           "text": "not a readable image"}


@dataclasses.dataclass(frozen=True)
class FakeImage:
  split: str
  cls: int  # class number within the fake (0-based, unique over the whole fake)
  kind: str = "rgb"  # rgb, gray, cmyk, png, rgba (a PNG with alpha), missing, truncated, text


@dataclasses.dataclass
class Expected:
  """What a build of a fake copy must give."""

  root: str  # the folder to pass as --manual_dir
  # split -> list of (label, image_id) of the sound images, in the order they are written.
  splits: dict[str, list[tuple[int, str]]]
  skipped: dict[str, str]  # path -> reason
  single: set[int]  # labels of classes with a single sound image
  empty: set[int]  # labels of classes without any image
  chains: dict[str, list[int]] = dataclasses.field(default_factory=dict)


def _plan(splits: tuple[str, str]) -> list[FakeImage]:
  """The standard damage, spread over a training and a test split."""
  train, test = splits
  plan = [FakeImage(train, 0, k) for k in ("rgb", "gray", "rgb", "rgb")]
  plan += [FakeImage(train, 1, k) for k in ("cmyk", "rgb", "truncated", "rgb")]
  plan += [FakeImage(train, 2, k) for k in ("rgb", "missing", "rgb")]
  plan += [FakeImage(train, 3, "rgb")]  # a class with a single image
  for i in range(3):
    plan += [FakeImage(test, 4 + i, k) for k in ("rgb", "rgba" if i == 1 else "png", "rgb")]
  plan += [FakeImage(test, 4, "text")]
  return plan


def image_bytes(kind: str, seed: int, size: tuple[int, int] | None = None,
                fmt: str | None = None) -> bytes:
  """A small real image file of the given kind (content depends on the seed)."""
  rng = np.random.default_rng(seed)
  h, w = size or (int(rng.integers(24, 48)), int(rng.integers(24, 48)))
  base = rng.integers(0, 256, size=3)
  pixels = np.clip(base + rng.normal(0, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
  image = Image.fromarray(pixels)
  out = io.BytesIO()
  if kind == "text":
    return b"this is not an image\n"
  if kind == "gray":
    image.convert("L").save(out, "JPEG", quality=90)
  elif kind == "cmyk":
    image.convert("CMYK").save(out, "JPEG", quality=90)
  elif kind == "rgba":
    image.convert("RGBA").save(out, "PNG")
  elif kind == "png" or fmt == "PNG":
    image.save(out, "PNG")
  else:
    image.save(out, "JPEG", quality=90)
  data = out.getvalue()
  if kind == "truncated":
    data = data[:len(data) * 2 // 3]
  return data


def _write_files(plan: list[FakeImage], path_of: Callable[[int, FakeImage], str],
                 label_of: Callable[[FakeImage], int], id_of: Callable[[int, FakeImage], str],
                 root: str) -> tuple[dict[str, list[tuple[int, str]]], dict[str, str]]:
  splits, skipped = {}, {}
  for i, item in enumerate(plan):
    path = os.path.join(root, path_of(i, item))
    if item.kind != "missing":
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "wb") as f:
        f.write(image_bytes(item.kind, seed=i))
    if item.kind in UNSOUND:
      skipped[path] = UNSOUND[item.kind]
    else:
      splits.setdefault(item.split, []).append((label_of(item), id_of(i, item)))
  return splits, skipped


def _singles(splits: dict[str, list[tuple[int, str]]], split: str) -> set[int]:
  labels = [label for label, _ in splits.get(split, [])]
  return {label for label in set(labels) if labels.count(label) == 1}


def write_cub(folder: str) -> Expected:
  """CUB_200_2011/: classes 1-4 train, 101-104 test (104 listed but empty)."""
  root = os.path.join(folder, "CUB_200_2011")
  plan = _plan(("train", "test"))
  class_id = lambda item: item.cls + 1 if item.split == "train" else 97 + item.cls
  name = lambda c: f"{c:03d}.Bird_{c}"
  path_of = lambda i, item: f"{name(class_id(item))}/Bird_{class_id(item)}_{i:04d}.jpg"
  splits, skipped = _write_files(plan, lambda i, item: f"images/{path_of(i, item)}",
                                 lambda item: class_id(item) - 1, lambda i, item: str(i + 1),
                                 root)
  classes = sorted({class_id(item) for item in plan}) + [104]
  with open(os.path.join(root, "classes.txt"), "w") as f:
    f.writelines(f"{c} {name(c)}\n" for c in classes)
  with open(os.path.join(root, "images.txt"), "w") as f:
    f.writelines(f"{i + 1} {path_of(i, item)}\n" for i, item in enumerate(plan))
  with open(os.path.join(root, "image_class_labels.txt"), "w") as f:
    f.writelines(f"{i + 1} {class_id(item)}\n" for i, item in enumerate(plan))
  with open(os.path.join(root, "train_test_split.txt"), "w") as f:
    f.writelines(f"{i + 1} {i % 2}\n" for i in range(len(plan)))
  return Expected(root=root, splits=splits, skipped=skipped, single=_singles(splits, "train"),
                  empty={103})


def write_cars(folder: str, devkit: bool = False) -> Expected:
  """Cars196 in the cars_annos.mat layout, or the devkit one: classes 1-4 train, 99-102 test."""
  root = os.path.join(folder, "cars196")
  plan = _plan(("train", "test"))
  class_id = lambda item: item.cls + 1 if item.split == "train" else 95 + item.cls
  num_classes = 196
  names = np.array([f"Car {c}" for c in range(1, num_classes + 1)], dtype=object)
  bbox = {f"bbox_{k}": np.uint16(v) for k, v in
          (("x1", 1), ("y1", 1), ("x2", 20), ("y2", 20))}
  if not devkit:
    path_of = lambda i, item: f"car_ims/{i + 1:06d}.jpg"
    splits, skipped = _write_files(plan, path_of, lambda item: class_id(item) - 1, path_of, root)
    fields = [("relative_im_path", "O"), *((k, "O") for k in bbox), ("class", "O"),
              ("test", "O")]
    annotations = np.zeros((1, len(plan)), dtype=fields)
    for i, item in enumerate(plan):
      annotations[0, i] = (path_of(i, item), *bbox.values(), np.uint8(class_id(item)),
                           np.uint8(item.split == "test"))
    scipy.io.savemat(os.path.join(root, "cars_annos.mat"),
                     {"annotations": annotations, "class_names": names[None, :]})
  else:
    # The devkit's own split mixes classes; ours is by class whatever the folder.
    folder_of = lambda i: "cars_train" if i % 2 == 0 else "cars_test"
    path_of = lambda i, item: f"{folder_of(i)}/{i + 1:05d}.jpg"
    splits, skipped = _write_files(plan, path_of, lambda item: class_id(item) - 1, path_of, root)
    # Listed file by file: the images of cars_train/ first.
    splits = {k: sorted(v, key=lambda e: not e[1].startswith("cars_train")) for k, v in
              splits.items()}
    os.makedirs(os.path.join(root, "devkit"), exist_ok=True)
    fields = [*((k, "O") for k in bbox), ("class", "O"), ("fname", "O")]
    for name, parity, where in (("cars_train_annos.mat", 0, "devkit"),
                                ("cars_test_annos_withlabels.mat", 1, "")):
      rows = [(i, item) for i, item in enumerate(plan) if i % 2 == parity]
      annotations = np.zeros((1, len(rows)), dtype=fields)
      for j, (i, item) in enumerate(rows):
        annotations[0, j] = (*bbox.values(), np.uint8(class_id(item)), f"{i + 1:05d}.jpg")
      scipy.io.savemat(os.path.join(root, where, name), {"annotations": annotations})
    scipy.io.savemat(os.path.join(root, "devkit", "cars_meta.mat"),
                     {"class_names": names[None, :]})
  for d in ("car_ims",) if not devkit else ("cars_train", "cars_test"):
    os.makedirs(os.path.join(root, d), exist_ok=True)
  # Classes 5-98 and 103-196 are listed (class_names) without images: they are empty.
  used = {class_id(item) - 1 for item in plan}
  return Expected(root=root, splits=splits, skipped=skipped, single=_singles(splits, "train"),
                  empty=set(range(num_classes)) - used)


def write_sop(folder: str) -> Expected:
  """Stanford_Online_Products/, with .JPG files; classes 1-4 train, 5-7 test."""
  root = os.path.join(folder, "Stanford_Online_Products")
  plan = _plan(("train", "test"))
  category = lambda item: "bicycle_final" if item.cls % 2 else "chair_final"
  path_of = lambda i, item: f"{category(item)}/{1000 + item.cls}_{i}.JPG"
  splits, skipped = _write_files(plan, path_of, lambda item: item.cls,
                                 lambda i, item: str(i + 1), root)
  for split in ("train", "test"):
    with open(os.path.join(root, f"Ebay_{split}.txt"), "w") as f:
      f.write("image_id class_id super_class_id path\n")
      for i, item in enumerate(plan):
        if item.split == split:
          f.write(f"{i + 1} {item.cls + 1} {item.cls % 2 + 1} {path_of(i, item)}\n")
  return Expected(root=root, splits=splits, skipped=skipped, single=_singles(splits, "train"),
                  empty=set())


def write_inshop(folder: str) -> Expected:
  """In-shop: Eval/list_eval_partition.txt and img/; items 1-4 train, 5-7 query/gallery."""
  root = os.path.join(folder, "inshop")
  # Query and gallery images of the same items (as published).
  plan = [p for p in _plan(("train", "test")) if p.split == "train"]
  plan += [FakeImage("query", c, k) for c, k in ((4, "rgb"), (5, "png"), (6, "rgb"))]
  plan += [FakeImage("gallery", c, k) for c, k in ((4, "rgb"), (4, "rgb"), (5, "rgb"),
                                                   (5, "text"), (6, "rgb"))]
  item_id = lambda item: f"id_{item.cls + 1:08d}"
  path_of = lambda i, item: f"img/WOMEN/Dresses/{item_id(item)}/{i:02d}_1_front.jpg"
  splits, skipped = _write_files(plan, path_of, lambda item: item.cls, path_of, root)
  os.makedirs(os.path.join(root, "Eval"), exist_ok=True)
  with open(os.path.join(root, "Eval", "list_eval_partition.txt"), "w") as f:
    f.write(f"{len(plan)}\nimage_name item_id evaluation_status\n")
    for i, item in enumerate(plan):
      f.write(f"{path_of(i, item):<60}{item_id(item):<16}{item.split}\n")
  return Expected(root=root, splits=splits, skipped=skipped, single=_singles(splits, "train"),
                  empty=set())


def write_hotels(folder: str) -> Expected:
  """Hotels-50K: hotels 100-103 (chains 7, 7, 9, unknown) train, their test images query."""
  root = os.path.join(folder, "hotels50k")
  plan = _plan(("train", "test"))
  # Test images are of training hotels: fold the test classes onto hotels 0-2.
  plan = [dataclasses.replace(p, cls=(p.cls - 4) % 3) if p.split == "test" else p for p in plan]
  hotel = lambda item: 100 + item.cls
  chain_of = {100: 7, 101: 7, 102: 9, 103: -1}
  folder_of = lambda item: "train" if item.split == "train" else "test/unoccluded"
  ext = lambda i: "png" if i % 5 == 0 else "jpg"
  path_of = lambda i, item: (f"images/{folder_of(item)}/{chain_of[hotel(item)]}/{hotel(item)}/"
                             f"travel_website/{5000 + i}.{ext(i)}")
  splits, skipped = _write_files(plan, path_of, lambda item: item.cls,
                                 lambda i, item: str(5000 + i), root)
  # A missing file is named where the layout says it should be.
  skipped = {(p.rsplit(".", 1)[0] + ".*" if r == "missing file" else p): r
             for p, r in skipped.items()}
  dataset = os.path.join(root, "input", "dataset")
  os.makedirs(dataset, exist_ok=True)
  os.makedirs(os.path.join(root, "images", "test", "low_occlusions"), exist_ok=True)
  with open(os.path.join(dataset, "hotel_info.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["hotel_id", "hotel_name", "chain_id", "latitude", "longitude"])
    for h, c in chain_of.items():
      w.writerow([h, f"Hotel {h}, Downtown", c, 38.9, -77.0])
  for split in ("train", "test"):
    with open(os.path.join(dataset, f"{split}_set.csv"), "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(["image_id", "hotel_id", "image_url", "image_source", "upload_timestamp"])
      for i, item in enumerate(plan):
        if item.split == split:
          w.writerow([5000 + i, hotel(item), f"https://example.invalid/{i}.jpg",
                      "travel_website", "2016-01-01 00:00:00"])
  chains = {split: [chain_of[100 + label] for label, _ in rows] for split, rows in splits.items()}
  return Expected(root=root, splits=splits, skipped=skipped, single=_singles(splits, "train"),
                  empty=set(), chains=chains)


WRITERS: dict[str, Callable[[str], Expected]] = {
    "cub": write_cub, "cars": write_cars, "sop": write_sop, "inshop": write_inshop,
    "hotels50k": write_hotels,
}
