"""What the five TFDS builders share: checking images, reporting problems, writing in order.

A builder subclasses `LayoutBuilder` and only says how to read its published layout
(`_find_root`, `_list`): the annotation files give, per split, the examples (image path,
label, image_id, chain). The base class refuses a listing that names files outside the
layout's folder (absolute paths, `..`), then checks every image (PIL decodes it, JPEGs at
1/8 scale, in a pool of threads; an image stored as it is must also decode with the decoder
training uses, `tf.io.decode_image`), skips what is unsound with its path and reason, and
writes the rest in listing order: shuffling is disabled, so record i of a split is the
i-th sound example, and the split's label, chain and image_id tables, saved in the
dataset's metadata (`metadata.json`), line up with the records without reading them.
Hand-written rather than TFDS's `ImageFolder` because none of the layouts is a folder per
class with the protocol's split, and because a damaged file must be skipped, not fatal.

Every stored image decodes to 3 channels (H, W, 3) through TFDS's own readers (tf.data
and `as_data_source`), as the declared `Image(shape=(None, None, 3))` promises. RGB JPEGs
and 8-bit RGB PNGs, nearly all of every benchmark, are stored as their original bytes.
Anything else -- grayscale or CMYK JPEGs, PNGs with alpha, a palette, gray or 16 bits,
other formats PIL reads (GIF, BMP, TIFF, WebP, ...) -- is stored as a PNG of PIL's RGB
conversion and reported as converted. PNG rather than a second JPEG: lossless, so the
stored pixels are exactly the RGB image PIL makes of the original; the files are larger,
but such images are few.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import os
import re
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

# The metadata's layout version; datasets.py refuses tables it does not understand.
METADATA_FORMAT = 1
# Examples listed ahead of the writer while their images are checked in threads.
_WINDOW_PER_WORKER = 8


class LayoutError(ValueError):
  """A missing folder or annotation file, or one that cannot be read: nothing is built."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One example as an annotation file lists it."""

  path: str  # absolute path of the image file
  label: int  # 0..C-1 over the whole dataset
  image_id: str
  chain: int = -1  # Hotels-50K only


@dataclasses.dataclass
class Listing:
  """What a layout's annotations say: examples per split and problems found while reading."""

  splits: dict[str, list[Entry]]
  # Per split, class label -> where to find it (class folder or name), for every class the
  # annotations define; a class whose images are all skipped is reported as empty.
  classes: dict[str, dict[int, str]]
  problems: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (where, what)
  warnings: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def require(path: epath.Path, layout: str, *, folder: bool = False) -> epath.Path:
  """`path` itself, or a LayoutError naming it and the layout that was expected."""
  ok = path.is_dir() if folder else path.is_file()
  if not ok:
    kind = "folder" if folder else "annotation file"
    raise LayoutError(f"missing {kind} {path}; expected {layout}")
  return path


def read_lines(path: epath.Path, layout: str) -> list[str]:
  require(path, layout)
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      return f.read().splitlines()
  except OSError as e:
    raise LayoutError(f"cannot read annotation file {path} ({e}); expected {layout}") from e


def check_image(path: str) -> tuple[bytes | None, str]:
  """(bytes to store, note) for a sound image, (None, reason) for one to skip.

  The note is "" for a JPEG or PNG stored as it is, or says from what it was converted.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    return None, "missing file"
  except IsADirectoryError:
    return None, "not a file"
  except OSError as e:
    return None, f"unreadable file ({e.strerror or e})"
  if not data:
    return None, "empty file"
  try:
    with Image.open(io.BytesIO(data)) as image:
      image_format, mode = image.format, image.mode
      if image_format == "JPEG":
        # Decoding at 1/8 scale reads every byte (so truncation shows) at a fraction of the cost.
        image.draft(mode, (max(1, image.width // 8), max(1, image.height // 8)))
      image.load()
  except Image.DecompressionBombError:
    return None, "image too large (decompression bomb check)"
  except (OSError, SyntaxError, ValueError, EOFError) as e:
    if "truncated" in str(e):
      return None, "truncated image"
    return None, "not a readable image"
  if _stored_as_is(data, image_format, mode):
    problem = training_decoder_problem(data)
    if problem:
      return None, f"TensorFlow cannot decode it ({problem})"
    return data, ""
  try:
    with Image.open(io.BytesIO(data)) as image:
      out = io.BytesIO()
      image.convert("RGB").save(out, "PNG")
  except (OSError, SyntaxError, ValueError, EOFError):
    return None, "not a readable image"
  return out.getvalue(), f"converted from {image_format} {mode} to PNG"


def training_decoder_problem(data: bytes) -> str | None:
  """Why the decoder training uses (tf.io.decode_image, `tf_pipeline.decode_image`) fails on
  `data`, which PIL read; None when it decodes. Images are stored only if it does."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.io.decode_image(data, channels=3, expand_animations=False)
  except (tf.errors.OpError, ValueError) as e:
    text = re.sub(r"\{\{.*?\}\}|\[Op:\w+\]", "", str(getattr(e, "message", e)))
    return " ".join(text.split())[:120]
  return None


def outside(root: str, path: str) -> bool:
  """Whether `path` (as an annotation file names it, joined to `root`) leaves `root`: an
  absolute path, or one with enough `..` (read lexically: links inside the layout are fine)."""
  root = os.path.normpath(os.path.abspath(root))
  path = os.path.normpath(os.path.join(root, path))
  return os.path.commonpath([root, path]) != root


def _stored_as_is(data: bytes, image_format: str, mode: str) -> bool:
  """Whether TFDS's readers decode the original bytes to 8-bit RGB: RGB JPEG, 8-bit RGB PNG."""
  if image_format == "JPEG":
    return mode == "RGB"
  # PNG header: bit depth at byte 24, colour type at 25 (2: truecolour without alpha).
  return image_format == "PNG" and mode == "RGB" and data[24:26] == b"\x08\x02"


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> Iterator[Any]:
  """fn over items in a pool of threads, results in order, a bounded number in flight."""
  window = max(1, workers) * _WINDOW_PER_WORKER
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    pending = collections.deque()
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) >= window:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


def dense_ids(values: Iterable[Any]) -> dict[Any, int]:
  """Sorted distinct values -> 0..C-1."""
  return {v: i for i, v in enumerate(sorted(set(values)))}


class LayoutBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the builders: a published layout in `manual_dir` -> class-disjoint splits."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "First release.",
      "1.1.0": "Every image decodes to RGB: non-RGB images are stored as RGB PNG.",
  }
  SPLIT_NAMES: tuple[str, ...] = ("train", "test")
  # Splits where a class with a single image is worth a warning (no positive pair).
  PAIR_SPLITS: tuple[str, ...] = ("train", "test")
  HAS_CHAIN = False
  DESCRIPTION = ""
  HOMEPAGE = ""
  # Threads checking images while the writer writes (PIL releases the GIL while decoding).
  workers = min(32, 2 * (os.cpu_count() or 1))
  # Set by prepare.py to see progress: called with (split, images checked, images listed).
  progress: Callable[[str, int, int], None] | None = None

  def _info(self) -> tfds.core.DatasetInfo:
    features = {
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.Scalar(np.int64, doc="class, 0..C-1 over the whole dataset"),
        "image_id": tfds.features.Text(),
    }
    if self.HAS_CHAIN:
      features["chain"] = tfds.features.Scalar(np.int64, doc="hotel chain, -1 when unknown")
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION, homepage=self.HOMEPAGE,
        features=tfds.features.FeaturesDict(features),
        metadata=tfds.core.MetadataDict(), disable_shuffling=True)

  # To implement by each builder. ---------------------------------------------------------

  def _find_root(self, manual_dir: epath.Path) -> epath.Path:
    """The folder of the published layout, given `manual_dir` (it or a folder inside it)."""
    raise NotImplementedError

  def _list(self, root: epath.Path) -> Listing:
    """The examples of every split, read from the annotation files under `root`."""
    raise NotImplementedError

  # Shared. -------------------------------------------------------------------------------

  def check_layout(self, manual_dir: str | os.PathLike) -> tuple[epath.Path, Listing]:
    """(root, listing) of the layout in `manual_dir`; LayoutError, one line, if it cannot be
    built from (missing files, an empty split, paths that leave the layout's folder)."""
    manual_dir = epath.Path(manual_dir)
    if not manual_dir.exists():  # a folder (the folder dataset's source may be a CSV file)
      raise LayoutError(f"missing folder {manual_dir} (the manual_dir); expected "
                        f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS.strip().splitlines()[0]}")
    root = self._find_root(manual_dir)
    listing = self._list(root)
    for split in self.SPLIT_NAMES:
      if not listing.splits.get(split):
        raise LayoutError(f"the annotation files under {root} list no image of the {split} "
                          f"split; expected {self.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}")
    base = os.fspath(root if root.is_dir() else root.parent)  # a CSV file's folder
    escaping = [e.path for entries in listing.splits.values() for e in entries
                if outside(base, e.path)]
    if escaping:
      shown = ", ".join(escaping[:3]) + (f" and {len(escaping) - 3} more" if len(escaping) > 3
                                          else "")
      raise LayoutError(f"the annotation files under {root} name {len(escaping)} image paths "
                        f"outside it ({shown}): absolute paths or '..' are refused; fix those "
                        "lines")
    return root, listing

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = epath.Path(dl_manager._manual_dir)  # pylint: disable=protected-access
    root, listing = self.check_layout(manual_dir)
    metadata = self.info.metadata
    metadata.clear()
    metadata.update(format=METADATA_FORMAT, root=os.fspath(root), splits={}, skipped=[],
                    converted=[], warnings=[])
    metadata["skipped"].extend([list(p) for p in listing.problems])
    metadata["warnings"].extend([list(w) for w in listing.warnings])
    self._listing = listing
    return {split: self._generate_examples(split) for split in self.SPLIT_NAMES}

  def _generate_examples(self, split: str):
    entries = self._listing.splits.get(split, [])
    metadata = self.info.metadata
    labels, chains, image_ids = [], [], []
    checked = ordered_map(check_image, (e.path for e in entries), self.workers)
    for done, (entry, (data, note)) in enumerate(zip(entries, checked), 1):
      if self.progress is not None:
        self.progress(split, done, len(entries))
      if data is None:
        metadata["skipped"].append([entry.path, note])
        continue
      if note:
        metadata["converted"].append([entry.path, note])
      example = {"image": data, "label": entry.label, "image_id": entry.image_id}
      if self.HAS_CHAIN:
        example["chain"] = entry.chain
      yield len(labels), example
      labels.append(entry.label)
      chains.append(entry.chain)
      image_ids.append(entry.image_id)
    table = {"labels": labels, "image_ids": image_ids}
    if self.HAS_CHAIN:
      table["chains"] = chains
    metadata["splits"][split] = table
    self._check_classes(split, labels)

  def _check_classes(self, split: str, labels: Sequence[int]) -> None:
    counts = collections.Counter(labels)
    for label, where in sorted(self._listing.classes.get(split, {}).items()):
      n = counts.get(label, 0)
      if n == 0:
        self.info.metadata["warnings"].append([where, f"empty class ({split}, label {label})"])
      elif n == 1 and split in self.PAIR_SPLITS:
        self.info.metadata["warnings"].append(
            [where, f"class with a single image, no positive pair ({split}, label {label})"])
