"""Decoded images kept between epochs, evaluations and runs: uint8 pixels, NumPy only.

A cache holds one split's images for one use, decoded and resized once:
- "train": shorter side resized to int(1.1 x image_size) (bilinear, antialiased), rounded to
  uint8, before the random crop (each image keeps its aspect ratio; a flat buffer plus a
  table of shapes);
- "eval": the final image_size x image_size center crop of the image resized to image_size.

It lives in memory (a NumPy array) or in a memory-mapped file on local disk, named by a
digest of everything its pixels depend on (`CacheKey`: the split's fingerprint, the use,
the image size and the resize rule), so that a changed setting or dataset never meets a
stale file. A file is written to a temporary name, then checked (sizes, key, a CRC32 per
image in its footer) and renamed: a run that dies or fills the disk leaves nothing a later
run would trust, and a truncated or corrupt file is reported in one line and rebuilt.

`cached_images` applies the policy (`CachePolicy`, from the config): a file already there is
read (or memory-mapped), else the cache is built in memory when it fits the budget, on disk
when it fits there, and under `auto` not at all (the images then go through tf.data).
This module reads and writes caches and resizes in-memory images (NumPy); decoding encoded
records is `tf_pipeline`'s job (the only part that needs TensorFlow).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import sys
import time
import uuid
import weakref
import zlib
from typing import Iterable, Iterator

import numpy as np
from absl import logging

from hn_jax.data.resize import (RESIZE_RULES, resized_shape, short_side,  # noqa: F401
                                train_short_side)
from hn_jax.data.splits import Split
from hn_jax.errors import RunStopped

MODES = ("auto", "memory", "disk", "off")
FORMAT_VERSION = 1
SUFFIX = ".hnimg"
_MAGIC, _END = b"HNJAXIMG", b"HNJAXEND"
_PREFIX = 16  # magic + 8 reserved bytes; the pixels start here
# Free disk left over after a cache file, and the share of RAM `auto` may fill by default.
DISK_MARGIN = 1 << 30
DEFAULT_MEMORY_FRACTION = 0.25


class CacheError(RunStopped):
  """A cache that cannot be built where asked; the message says what to change (one line:
  a RunStopped, as the commands print it)."""


class UndecodableImage(RunStopped):
  """A prepared image TensorFlow cannot decode (prepared before `prepare` checked for that)."""


def _undecodable(split: Split, error: BaseException) -> UndecodableImage | None:
  if type(error).__name__ != "InvalidArgumentError":  # tf.errors', without importing TF
    return None
  reason = " ".join(str(getattr(error, "message", error)).split("\n")[0].split())[:160]
  dataset = (split.name or "the dataset").rsplit("-", 1)[0]
  return UndecodableImage(
      f"an image of {split.name or 'a split'} cannot be decoded ({reason}); {dataset} was "
      "prepared without checking its images with TensorFlow: prepare it again with "
      f"python -m hn_jax.tools.prepare --dataset={dataset} --overwrite (it skips and names "
      "such images)")


class CorruptCache(ValueError):
  """A cache file that must not be used (truncated, corrupt, or of another key)."""


@dataclasses.dataclass(frozen=True)
class CacheKey:
  """Everything a cache's pixels depend on."""

  fingerprint: str  # the split's images (prepared dataset files, or in-memory pixels)
  kind: str  # "train" or "eval"
  image_size: int

  def to_dict(self) -> dict:
    return dict(format=FORMAT_VERSION, fingerprint=self.fingerprint, kind=self.kind,
                image_size=self.image_size, resize=RESIZE_RULES[self.kind])

  def digest(self) -> str:
    return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:20]

  @property
  def short_side(self) -> int:
    return short_side(self.kind, self.image_size)


# ---------------------------------------------------------------------------------------------
# The decoded images.


_IN_MEMORY: "weakref.WeakSet[DecodedImages]" = weakref.WeakSet()


class DecodedImages:
  """N uint8 RGB images of any shapes in one flat buffer (array or memory map)."""

  def __init__(self, data: np.ndarray, shapes: np.ndarray, path: str | None = None):
    self.data = data
    self.shapes = np.asarray(shapes, np.int64).reshape(-1, 2)
    sizes = self.shapes[:, 0] * self.shapes[:, 1] * 3
    self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    self.path = path
    self.in_memory = not isinstance(data, np.memmap)
    if self.in_memory:
      _IN_MEMORY.add(self)
    same = len(self.shapes) > 0 and (self.shapes == self.shapes[:1]).all()
    # Images of one shape (the eval crops): an (N, H, W, 3) view for fast gathers.
    self.stacked = (data[:int(sizes.sum())].reshape(len(self.shapes), *self.shapes[0], 3)
                    if same else None)

  def __len__(self) -> int:
    return len(self.shapes)

  @property
  def nbytes(self) -> int:
    return int(self.data.size)

  def image(self, i: int) -> np.ndarray:
    h, w = self.shapes[i]
    start = self.offsets[i]
    return self.data[start:start + h * w * 3].reshape(h, w, 3)

  def gather(self, rows: np.ndarray) -> np.ndarray:
    """Images `rows` (all of one shape) as (len(rows), H, W, 3)."""
    if self.stacked is not None:
      return self.stacked[np.asarray(rows)]
    return np.stack([self.image(int(i)) for i in rows])

  def crops(self, rows: np.ndarray, tops: np.ndarray, lefts: np.ndarray,
            size: int) -> np.ndarray:
    """The size x size crop at (top, left) of each image of `rows`: uint8 (len(rows), size,
    size, 3). (Mirroring is left to the step: NumPy copies reversed 3-byte pixels at a
    tenth of the speed of plain rows.)"""
    out = np.empty((len(rows), size, size, 3), np.uint8)
    for j, i in enumerate(rows):
      out[j] = self.image(int(i))[tops[j]:tops[j] + size, lefts[j]:lefts[j] + size]
    return out


def memory_in_use() -> int:
  """Bytes of decoded images this process holds in memory (its live in-memory caches)."""
  return sum(c.nbytes for c in list(_IN_MEMORY))


def memory_budget(gigabytes: float) -> int:
  """The bytes `auto` may hold in memory: `gigabytes`, or by default a quarter of the RAM."""
  if gigabytes and gigabytes > 0:
    return int(gigabytes * 1e9)
  try:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    total = 8 << 30
  return int(total * DEFAULT_MEMORY_FRACTION)


def from_arrays(images: Iterable[np.ndarray], count: int) -> DecodedImages:
  """A cache in memory from `count` uint8 (H, W, 3) images."""
  shapes, parts = np.zeros((count, 2), np.int64), []
  for i, image in enumerate(images):
    shapes[i] = image.shape[:2]
    parts.append(np.ascontiguousarray(image, np.uint8).reshape(-1))
  _check_count(len(parts), count)
  data = np.concatenate(parts) if parts else np.zeros((0,), np.uint8)
  return DecodedImages(data, shapes)


def _check_count(got: int, count: int) -> None:
  if got != count:
    raise CacheError(f"the image source gave {got} images for a split of {count}")


# ---------------------------------------------------------------------------------------------
# Files: magic, pixels, table (shapes, CRC32 of each image), JSON footer, its length, end mark.


def file_name(split_name: str, key: CacheKey) -> str:
  name = "".join(c if c.isalnum() or c in "-_" else "_" for c in split_name) or "split"
  return f"{name}-{key.kind}{key.image_size}-{key.digest()}{SUFFIX}"


def write_file(path: str, key: CacheKey, images: Iterable[np.ndarray], count: int,
               expected_bytes: int | None = None) -> None:
  """Writes `count` uint8 images to the cache file `path`, atomically.

  The file appears under its name only once complete and flushed to disk; on any error
  (a full disk, an interrupt) the partial file is removed and nothing is left at `path`.
  """
  folder = os.path.dirname(os.path.abspath(path))
  tmp = f"{path}{_TMP_MARK}{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  done = False
  try:
    os.makedirs(folder, exist_ok=True)
    with open(tmp, "wb") as f:
      f.write(_MAGIC + bytes(_PREFIX - len(_MAGIC)))
      table = np.zeros((count, 3), np.uint32)  # H, W, CRC32
      written = got = 0
      for i, image in enumerate(images):
        got = i + 1
        if i >= count:
          continue
        pixels = np.ascontiguousarray(image, np.uint8)
        if pixels.ndim != 3 or pixels.shape[2] != 3:
          raise CacheError(f"image {i} has shape {pixels.shape}; expected (H, W, 3)")
        f.write(memoryview(pixels).cast("B"))
        table[i] = (pixels.shape[0], pixels.shape[1], zlib.crc32(memoryview(pixels).cast("B")))
        written += pixels.size
      _check_count(got, count)
      table_bytes = table.tobytes()
      f.write(table_bytes)
      footer = json.dumps(dict(key=key.to_dict(), count=count, data_bytes=written,
                               table_crc32=zlib.crc32(table_bytes))).encode()
      f.write(footer)
      f.write(np.uint64(len(footer)).tobytes() + _END)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    done = True
  except OSError as e:
    needed = "" if expected_bytes is None else f" (it needs about {expected_bytes / 1e9:.2f} GB)"
    raise CacheError(
        f"cannot write the image cache {path}{needed}: {e.strerror or e}; free space there, "
        "set --config.cache_dir to a local disk with room, or use --config.cache=memory "
        "(or off)") from e
  finally:
    if not done and os.path.exists(tmp):
      os.remove(tmp)


_TMP_MARK = ".tmp-"  # PATH.tmp-HOST-PID-RANDOM: a cache file being written


def _host() -> str:
  return "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40] or "host"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:
    return True  # someone else's live process
  return True


def remove_stale_temporaries(path: str) -> list[str]:
  """Removes the temporary files of `path` left by a cache build that died on this host (its
  process is gone); another host's, or a live process's, are left alone. What it removed."""
  folder, name = os.path.split(os.path.abspath(path))
  removed = []
  try:
    entries = os.listdir(folder)
  except OSError:
    return removed
  for entry in entries:
    if not entry.startswith(name + _TMP_MARK):
      continue
    fields = entry[len(name + _TMP_MARK):].split("-")
    if len(fields) == 3 and fields[0] != _host():
      continue  # written from another host: its process cannot be checked from here
    try:
      pid = int(fields[-2])
    except (ValueError, IndexError):
      continue
    if _alive(pid):
      continue
    try:
      os.remove(os.path.join(folder, entry))
      removed.append(entry)
    except OSError:
      pass
  if removed:
    logging.warning("image cache: removed %d unfinished file(s) of a build that died: %s",
                    len(removed), ", ".join(removed))
  return removed


def read_file(path: str, key: CacheKey, *, load: bool) -> DecodedImages:
  """The cache in the file `path`: read into memory (`load`) or memory-mapped.

  Every byte is checked against the footer's sizes and CRC32s first; raises CorruptCache
  (with the reason) for a truncated, damaged or foreign file.
  """
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    if size < 2 * _PREFIX or f.read(len(_MAGIC)) != _MAGIC:
      raise CorruptCache("not a cache file or truncated (no header)")
    f.seek(size - _PREFIX)
    tail = f.read(_PREFIX)
    if tail[8:] != _END:
      raise CorruptCache("truncated (no end mark)")
    footer_len = int(np.frombuffer(tail[:8], np.uint64)[0])
    if footer_len > size - 2 * _PREFIX:
      raise CorruptCache("truncated or corrupt footer")
    f.seek(size - _PREFIX - footer_len)
    try:
      footer = json.loads(f.read(footer_len))
      count, data_bytes = int(footer["count"]), int(footer["data_bytes"])
    except (ValueError, KeyError, TypeError) as e:
      raise CorruptCache(f"unreadable footer ({e})") from e
    if footer.get("key") != key.to_dict():
      raise CorruptCache("written for other settings or data")
    if _PREFIX + data_bytes + 12 * count + footer_len + _PREFIX != size:
      raise CorruptCache("its size does not match its footer (truncated?)")
    f.seek(_PREFIX + data_bytes)
    table_bytes = f.read(12 * count)
    if zlib.crc32(table_bytes) != footer.get("table_crc32"):
      raise CorruptCache("its table of shapes is corrupt")
    table = np.frombuffer(table_bytes, np.uint32).reshape(count, 3).astype(np.int64)
    if int((table[:, 0] * table[:, 1] * 3).sum()) != data_bytes:
      raise CorruptCache("its table of shapes does not match its size")
    f.seek(_PREFIX)
    data = np.empty((data_bytes,), np.uint8) if load else None
    start = 0
    for i, (h, w, crc) in enumerate(table):
      n = int(h * w * 3)
      if load:
        view = memoryview(data[start:start + n])
        f.readinto(view)
      else:
        view = f.read(n)
      if zlib.crc32(view) != crc:
        raise CorruptCache(f"image {i} is corrupt (CRC32 mismatch)")
      start += n
  if not load:
    data = np.memmap(path, np.uint8, mode="r", offset=_PREFIX, shape=(data_bytes,))
  return DecodedImages(data, table[:, :2], path=path)


# ---------------------------------------------------------------------------------------------
# Resizing in NumPy (in-memory splits and folder images): the tf.data path's filter.


def _filter(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(source index, weight), each (out_size, taps): the antialiased triangle filter of
  TensorFlow's ScaleAndTranslate (tf.image.resize bilinear, antialias=True), no translation."""
  scale = out_size / in_size
  kernel_scale = max(1.0 / scale, 1.0)
  sample = (np.arange(out_size) + 0.5) / scale  # in input pixel units, centre at +0.5
  radius = kernel_scale
  first = np.ceil(sample - radius - 0.5).astype(np.int64)
  taps = min(int(2 * np.ceil(radius)) + 1, in_size)
  index = first[:, None] + np.arange(taps)[None, :]
  weight = np.maximum(0.0, 1.0 - np.abs(index + 0.5 - sample[:, None]) / kernel_scale)
  weight = np.where((index >= 0) & (index < in_size), weight, 0.0)
  weight /= weight.sum(axis=1, keepdims=True)
  return np.clip(index, 0, in_size - 1), weight


def _matrix(in_size: int, out_size: int) -> np.ndarray:
  """The filter as a dense (out_size, in_size) float32 matrix (one BLAS call per axis)."""
  index, weight = _filter(in_size, out_size)
  matrix = np.zeros((out_size, in_size), np.float64)
  np.add.at(matrix, (np.repeat(np.arange(out_size), index.shape[1]), index.reshape(-1)),
            weight.reshape(-1))
  return matrix.astype(np.float32)


def resize(images: np.ndarray, height: int, width: int) -> np.ndarray:
  """Images (..., H, W, C) resized to (height, width), float32 (not rounded)."""
  x = np.asarray(images, np.float32)
  if x.shape[-3] != height:
    x = np.einsum("oh,...hwc->...owc", _matrix(x.shape[-3], height), x, optimize=True)
  if x.shape[-2] != width:
    x = np.einsum("pw,...owc->...opc", _matrix(x.shape[-2], width), x, optimize=True)
  return x


def to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def transform(images: np.ndarray, kind: str, image_size: int) -> np.ndarray:
  """The cached form of uint8 images (..., H, W, 3) of one shape: "train" resized, "eval"
  resized and center-cropped; uint8."""
  h, w = images.shape[-3:-1]
  rh, rw = resized_shape(h, w, short_side(kind, image_size))
  resized = resize(images, rh, rw)
  if kind == "eval":
    top, left = (rh - image_size) // 2, (rw - image_size) // 2
    resized = resized[..., top:top + image_size, left:left + image_size, :]
  return to_uint8(resized)


def transform_in_memory(images: np.ndarray, kind: str, image_size: int,
                        chunk: int = 64) -> Iterator[np.ndarray]:
  """`transform` of every image of an (N, H, W, 3) array, one image at a time, in order."""
  for start in range(0, len(images), chunk):
    yield from transform(images[start:start + chunk], kind, image_size)


def progress_bar(iterable: Iterable, total: int, desc: str):
  """A tqdm bar on stderr when it is a terminal (and tqdm is installed)."""
  try:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return iterable
  return tqdm(iterable, total=total, desc=desc, unit="image", file=sys.stderr,
              mininterval=2.0, disable=None)


# ---------------------------------------------------------------------------------------------
# The policy: where a split's cache lives (memory, a file, nowhere), chosen once per process.


@dataclasses.dataclass(frozen=True)
class CachePolicy:
  """How decoded images are kept: the config's `cache`, `cache_dir` and `cache_memory_gb`."""

  mode: str = "auto"  # one of MODES
  folder: str = ""  # cache files go here; "": the split's own cache_folder
  memory_gb: float = 0.0  # what `auto` may hold in memory; 0: a quarter of the RAM

  @classmethod
  def from_config(cls, config) -> "CachePolicy":
    mode = config.get("cache", "auto")
    if mode not in MODES:
      raise ValueError(f"config.cache={mode!r}; use one of {', '.join(MODES)}")
    return cls(mode, config.get("cache_dir", ""), float(config.get("cache_memory_gb", 0.0)))


# This process's caches of each live split, by (policy, CacheKey); None: read uncached.
_OPENED: "weakref.WeakKeyDictionary[Split, dict]" = weakref.WeakKeyDictionary()


def cached_images(split: Split, kind: str, image_size: int,
                  policy: CachePolicy) -> DecodedImages | None:
  """The split's decoded images for `kind` ("train" or "eval") as `policy` says, built or
  read once per process; None when the images go through tf.data instead."""
  if policy.mode == "off" or len(split) == 0:
    return None
  key = CacheKey(split.identity, kind, int(image_size))
  opened = _OPENED.setdefault(split, {})
  if (policy, key) not in opened:
    try:
      try:
        opened[(policy, key)] = _open_or_build(split, key, policy)
      except MemoryError:
        raise CacheError(
            f"out of memory holding the decoded images of {split.name or 'a split'} "
            f"({key.kind}); use --config.cache=disk (a memory-mapped file) or "
            "--config.cache=off, or lower --config.cache_memory_gb") from None
      except Exception as e:  # pylint: disable=broad-except; TensorFlow's decoding errors
        undecodable = _undecodable(split, e)
        if undecodable is None:
          raise
        raise undecodable from None
    except CacheError as e:
      if policy.mode != "auto":
        raise
      logging.warning("image cache: %s; reading the images uncached", e)
      opened[(policy, key)] = None
  return opened[(policy, key)]


def opened(split: Split) -> dict:
  """This process's caches of `split` so far: {(policy, CacheKey): DecodedImages or None}."""
  return dict(_OPENED.get(split, {}))


def _open_or_build(split: Split, key: CacheKey, policy: CachePolicy) -> DecodedImages | None:
  folder = policy.folder or split.cache_folder
  path = os.path.join(folder, file_name(split.name, key)) if folder else None
  budget = memory_budget(policy.memory_gb) - memory_in_use()
  if path:
    remove_stale_temporaries(path)
  if path and os.path.exists(path):
    cache = _read_existing(path, key, policy.mode, budget)
    if cache is not None:
      return cache
  needed = _estimate_bytes(split, key)
  free = _free_bytes(folder) if folder else 0
  where = _choose(policy.mode, needed, budget, free, path)
  if where is None:
    logging.warning(
        "image cache: %s's %s images (about %.1f GB decoded) fit neither the memory budget "
        "(%.1f GB, config.cache_memory_gb) nor the free disk (%.1f GB in %s); reading them "
        "uncached", split.name or "the split", key.kind, needed / 1e9, max(budget, 0) / 1e9,
        free / 1e9, folder or "no cache folder")
    return None
  if where == "disk":
    if not path:
      raise CacheError(
          "config.cache=disk needs a folder for the cache file: set --config.cache_dir (images "
          "held in memory, as digits and synthetic, have no data_dir)")
    if os.path.exists(folder) and not os.path.isdir(folder):
      raise CacheError(
          f"config.cache=disk: the cache folder {folder} is a file; set --config.cache_dir to "
          "a folder (or move the file), or use --config.cache=memory or off")
    if free < needed + DISK_MARGIN:
      raise CacheError(
          f"config.cache=disk: {split.name or 'the split'}'s {key.kind} cache needs about "
          f"{needed / 1e9:.2f} GB but {folder} has {free / 1e9:.2f} GB free (or is not "
          "writable); set --config.cache_dir to a local disk with room, or use "
          "--config.cache=memory or off")
    write_file(path, key, _decode_all(split, key, path), len(split), needed)
    return read_file(path, key, load=False)
  # Memory: through a file when there is room for one, so that later runs reuse it.
  if path and free >= needed + DISK_MARGIN:
    try:
      write_file(path, key, _decode_all(split, key, f"memory, saved to {path}"), len(split),
                 needed)
      return read_file(path, key, load=True)
    except CacheError as e:
      logging.warning("image cache: %s; keeping the images in memory only", e)
  return from_arrays(_decode_all(split, key, "memory"), len(split))


def _read_existing(path: str, key: CacheKey, mode: str, budget: int) -> DecodedImages | None:
  """The cache file at `path`, loaded or mapped; None (file removed) if it is unusable."""
  load = mode == "memory" or (mode == "auto" and os.path.getsize(path) <= budget)
  try:
    cache = read_file(path, key, load=load)
  except CorruptCache as e:
    try:
      os.remove(path)
    except OSError as removing:  # a read-only folder: rebuilt elsewhere (or not at all)
      logging.warning("image cache %s is unusable (%s) and cannot be removed (%s): building "
                      "the images anew without it", path, e, removing.strerror or removing)
      return None
    logging.warning("image cache %s is unusable (%s): rebuilding it", path, e)
    return None
  logging.info("image cache: %s %s", "loaded" if load else "mapped", path)
  return cache


def _choose(mode: str, needed: int, budget: int, free: int, path: str | None) -> str | None:
  """"memory" or "disk" for a new cache of `needed` bytes; None: no cache (`auto` only)."""
  if mode != "auto":
    return mode
  if needed <= budget:
    return "memory"
  if path and needed + max(DISK_MARGIN, free // 10) <= free:
    return "disk"  # leaving a tenth of the free space to others
  return None


def _estimate_bytes(split: Split, key: CacheKey) -> int:
  """The bytes of a split's cache: exact for eval and in-memory images, else from a sample."""
  n = len(split)
  if key.kind == "eval":
    return n * key.image_size**2 * 3
  if isinstance(split.images, np.ndarray):
    h, w = resized_shape(*split.images.shape[1:3], key.short_side)
    return n * h * w * 3
  from hn_jax.data import tf_pipeline  # pylint: disable=g-import-not-at-top
  sample = np.unique(np.linspace(0, n - 1, min(n, 32)).astype(np.int64))
  shapes = tf_pipeline.decoded_shapes(split.images, sample)
  sizes = [np.prod(resized_shape(h, w, key.short_side)) * 3 for h, w in shapes]
  return int(np.mean(sizes) * n * (1.0 if len(sample) == n else 1.05))


def _decode_all(split: Split, key: CacheKey, where: str) -> Iterator[np.ndarray]:
  """Every image of the split in the cache's form, in order, behind a progress bar."""
  logging.info("image cache: decoding the %d images of %s for its %s cache (%s), once",
               len(split), split.name or "a split", key.kind, where)
  start = time.monotonic()
  if isinstance(split.images, np.ndarray):
    images = transform_in_memory(split.images, key.kind, key.image_size)
  else:
    from hn_jax.data import tf_pipeline  # pylint: disable=g-import-not-at-top
    images = tf_pipeline.decoded(split.images, key.kind, key.image_size)
  desc = f"decoding {split.name or 'a split'} for its {key.kind} cache"
  yield from progress_bar(images, len(split), desc)
  logging.info("image cache: %s's %s cache built in %.1f s", split.name or "the split",
               key.kind, time.monotonic() - start)


def _free_bytes(folder: str) -> int:
  try:
    os.makedirs(folder, exist_ok=True)
    if not os.access(folder, os.W_OK):
      return 0
    return shutil.disk_usage(folder).free
  except OSError:
    return 0
