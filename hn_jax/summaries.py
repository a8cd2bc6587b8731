"""What a run shows in TensorBoard beside its scalars: HParams, Projector and neighbour images.

* HParams: `write_hparams` writes the run's flattened config (the session's hyperparameters;
  TensorBoard's metric columns are the last values of the run's scalars: the final test R@K,
  MAP@R, loss, learning rate...) into one event file of its own,
  `events.out.tfevents.*.hparams`, rewritten whole whenever the run (re)starts and when it
  ends (TensorBoard keeps the first summary metadata of a tag it reads, so a second record in
  the same run would be ignored; one file, replaced, stays consistent).
* Projector: `write_projector_points` and `add_projector_tensor` write the files that
  TensorBoard's projector plugin reads without a TensorFlow checkpoint:
  `projector_config.pbtxt` in the log dir, and in `projector/` one `<name>.tsv` of float32
  L2-normalized embeddings per evaluation, `metadata.tsv` (a header, then label and index
  into the split; `hn_jax.tools.embed` adds the image ids) and `sprite.png` (thumbnails in a
  square grid, row-major, `single_image_dim` pixels each).
* Neighbours: `neighbour_sheet` draws a fixed set of test queries with their nearest
  neighbours (`hn_jax.sheets`), which `RunSummaries` writes as an image summary.

`RunSummaries` is what training calls: at the start, at every evaluation (with the
embeddings the evaluation computed, so nothing is embedded twice) and at the end. Only
process 0 writes. No JAX here; no TensorFlow unless the eval images must be decoded from
records (no image cache).
"""

from __future__ import annotations

import errno
import itertools
import math
import os
import socket
import time
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from hn_jax import run_config, sheets
from hn_jax.errors import DiskFull

HPARAMS_SUFFIX = ".hparams"
PROJECTOR_CONFIG = "projector_config.pbtxt"  # tensorboard.plugins.projector's file name
PROJECTOR_DIR = "projector"
METADATA_FILE = "metadata.tsv"
SPRITE_FILE = "sprite.png"
SPRITE_THUMB = 32  # pixels of a sprite thumbnail (less when the grid would pass SPRITE_MAX)
SPRITE_MAX = 8192  # the projector's largest sprite side (a WebGL texture)
SAMPLE_SEED = 0  # the projector's points and the neighbour queries: the same in every run
NEIGHBOURS_K = 8  # neighbours per query on the neighbour sheet
NEIGHBOURS_THUMB = 64


# ----------------------------------------------------------------------------- HParams


def flat_hparams(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  """The config as HParams values: nested keys joined by ".", sequences as strings."""
  flat = {}

  def visit(prefix: str, value: Any) -> None:
    if isinstance(value, Mapping):
      for k, v in value.items():
        visit(f"{prefix}{k}.", v)
      return
    key = prefix[:-1]
    if isinstance(value, (bool, int, float, str)):
      flat[key] = value
    elif value is None:
      flat[key] = ""
    else:  # tuples, lists
      flat[key] = str(tuple(value) if isinstance(value, list) else value)

  visit("", run_config.as_plain(config))
  return dict(sorted(flat.items()))


def hparams_summaries(hparams: Mapping[str, Any], *, finished: bool = False,
                      start_time: float | None = None) -> list:
  """The HParams plugin's summaries (tensorboard protos): the session's start (the values)
  and, when `finished`, its end (status SUCCESS).

  No experiment summary: without one, TensorBoard derives the columns from every run it
  reads, lists first the settings whose values differ between runs, and takes every scalar
  tag as a metric (its last value).
  """
  from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
  from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2  # pylint: disable=g-import-not-at-top

  def summary(tag: str, data) -> summary_pb2.Summary:
    value = summary_pb2.Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(data),
                                      tensor=metadata.NULL_TENSOR)
    return summary_pb2.Summary(value=[value])

  now = time.time()
  start = plugin_data_pb2.SessionStartInfo(start_time_secs=start_time or now)
  for k, v in hparams.items():
    if isinstance(v, bool):
      start.hparams[k].bool_value = v
    elif isinstance(v, (int, float)):
      start.hparams[k].number_value = v
    else:
      start.hparams[k].string_value = str(v)
  out = [summary(metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(
      session_start_info=start))]
  if finished:
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=now)
    out.append(summary(metadata.SESSION_END_INFO_TAG,
                       plugin_data_pb2.HParamsPluginData(session_end_info=end)))
  return out


def write_hparams(workdir: str | os.PathLike, config: ml_collections.ConfigDict, *,
                  finished: bool = False) -> epath.Path:
  """Replaces the workdir's HParams event file by one of `config` (see the module doc).

  Written with tensorboard's pure-Python record writer (no TensorFlow import)."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  from tensorboard.summary.writer import record_writer  # pylint: disable=g-import-not-at-top
  folder = run_config.workdir_path(workdir)
  folder.mkdir(parents=True, exist_ok=True)
  old = list(folder.glob(f"events.out.tfevents.*{HPARAMS_SUFFIX}"))
  start_time = _first_start_time(old)
  path = folder / (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                   f"{os.getpid()}.{next(_FILE_NUMBERS)}{HPARAMS_SUFFIX}")
  events = [event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")]
  events += [event_pb2.Event(wall_time=time.time(), step=0, summary=summary)
             for summary in hparams_summaries(flat_hparams(config), finished=finished,
                                              start_time=start_time)]
  with path.open("wb") as f:
    writer = record_writer.RecordWriter(f)
    for event in events:
      writer.write(event.SerializeToString())
  for stale in old:
    if stale != path:
      stale.unlink(missing_ok=True)
  return path


_FILE_NUMBERS = itertools.count()


def mark_run(folder: str | os.PathLike) -> None:
  """Makes `folder` a TensorBoard run unless it holds event files: an event file of no
  summary, so that its projector files show under a parent log dir too. Named
  `projector.tfevents.*` (TensorBoard reads any file with "tfevents" in its name), not
  `events.out.tfevents.*`, so that `hn_jax.tools.report` does not count it as a run."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  from tensorboard.summary.writer import record_writer  # pylint: disable=g-import-not-at-top
  folder = epath.Path(folder)
  if any(folder.glob("*tfevents*")):
    return
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / (f"projector.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                   f"{os.getpid()}")
  with path.open("wb") as f:
    record_writer.RecordWriter(f).write(
        event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())


def _first_start_time(files: Sequence[epath.Path]) -> float | None:
  """The session start time an earlier HParams file of the run recorded (a resumed run keeps
  it), else None."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  from tensorboard.plugins.hparams import metadata  # pylint: disable=g-import-not-at-top
  from hn_jax.tools import report  # pylint: disable=g-import-not-at-top
  for path in sorted(files):
    try:
      for record in report.iter_records(path):
        for value in event_pb2.Event.FromString(record).summary.value:
          if value.tag == metadata.SESSION_START_INFO_TAG:
            data = metadata.parse_session_start_info_plugin_data(
                value.metadata.plugin_data.content)
            return data.start_time_secs
    except Exception:  # pylint: disable=broad-except; a damaged file is replaced anyway
      continue
  return None


# ----------------------------------------------------------------------------- Projector


def sample_points(labels: np.ndarray, cap: int, seed: int = SAMPLE_SEED) -> np.ndarray:
  """Up to `cap` indices into `labels`, sorted: whole classes in a seeded random order until
  the cap (the last class cut short), so that the projector shows clusters even on sets of
  many small classes. All indices when the split holds no more than `cap` points."""
  labels = np.asarray(labels)
  if cap <= 0:
    return np.zeros((0,), np.int64)
  if len(labels) <= cap:
    return np.arange(len(labels), dtype=np.int64)
  classes = np.unique(labels)
  order = np.random.default_rng(seed).permutation(len(classes))
  by_class = np.argsort(labels, kind="stable")
  starts = np.searchsorted(labels[by_class], classes)
  ends = np.append(starts[1:], len(labels))
  chosen = np.concatenate([by_class[starts[c]:ends[c]] for c in order])[:cap]
  return np.sort(chosen).astype(np.int64)


def sprite_image(thumbs: np.ndarray) -> np.ndarray:
  """Thumbnails (N, S, S, 3) in a square grid of ceil(sqrt(N)) columns, row-major, white
  where the grid has no thumbnail: uint8 (G*S, G*S, 3)."""
  n, size = len(thumbs), thumbs.shape[1]
  grid = max(1, math.ceil(math.sqrt(n)))
  out = np.full((grid * grid, size, size, 3), 255, np.uint8)
  out[:n] = thumbs
  return out.reshape(grid, grid, size, size, 3).transpose(0, 2, 1, 3, 4).reshape(
      grid * size, grid * size, 3)


def sprite_thumb(n: int) -> int:
  """Thumbnail side of a sprite of `n` points (the grid within SPRITE_MAX pixels)."""
  return max(1, min(SPRITE_THUMB, SPRITE_MAX // max(1, math.ceil(math.sqrt(n)))))


def square_thumbnails(images: Sequence[np.ndarray], size: int) -> np.ndarray:
  """uint8 (N, size, size, 3): each image center-cropped to a square and resized."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = np.empty((len(images), size, size, 3), np.uint8)
  for i, image in enumerate(images):
    image = np.asarray(image, np.uint8)
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, -1)
    h, w = image.shape[:2]
    side = min(h, w)
    image = image[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    if side == size:
      out[i] = image[..., :3]
      continue
    picture = Image.fromarray(np.ascontiguousarray(image[..., :3]))
    method = Image.Resampling.NEAREST if size >= 2 * side else Image.Resampling.BOX
    out[i] = np.asarray(picture.resize((size, size), method))
  return out


def _tsv_cell(value: Any) -> str:
  return " ".join(str(value).split()) or "-"


def write_projector_points(folder: str | os.PathLike, columns: Mapping[str, Sequence[Any]],
                           thumbs: np.ndarray | None) -> bool:
  """Writes `projector/metadata.tsv` (one column per entry of `columns`) and, with
  thumbnails, `projector/sprite.png`, unless the same points are there already. Returns
  whether it wrote them; writing new points removes the tensors of other points."""
  folder = epath.Path(folder)
  assets = folder / PROJECTOR_DIR
  names = list(columns)
  n = len(columns[names[0]])
  lines = ["\t".join(names)] + ["\t".join(_tsv_cell(columns[c][i]) for c in names)
                                for i in range(n)]
  text = "\n".join(lines) + "\n"
  path = assets / METADATA_FILE
  sprite_path = assets / SPRITE_FILE
  if path.exists() and path.read_text() == text and (thumbs is None or sprite_path.exists()):
    return False
  if assets.exists():  # other points: their tensors and config entries no longer fit
    for old in assets.glob("*"):
      old.unlink()
    (folder / PROJECTOR_CONFIG).unlink(missing_ok=True)
  assets.mkdir(parents=True, exist_ok=True)
  if thumbs is not None:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with sprite_path.open("wb") as f:
      Image.fromarray(sprite_image(thumbs)).save(f, format="PNG", compress_level=1)
  _replace(path, text)
  return True


def add_projector_tensor(folder: str | os.PathLike, name: str, embeddings: np.ndarray,
                         thumb: int | None) -> epath.Path:
  """Writes `projector/<name>.tsv` (L2-normalized float32, one row per point of
  metadata.tsv) and lists it in `projector_config.pbtxt`, last (replacing an entry of the
  same name), with the metadata and the sprite of `thumb` pixels (None: no sprite)."""
  from google.protobuf import text_format  # pylint: disable=g-import-not-at-top
  from tensorboard.plugins.projector import projector_config_pb2  # pylint: disable=g-import-not-at-top
  folder = epath.Path(folder)
  x = np.asarray(embeddings, np.float32)
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))
  file_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) + ".tsv"
  tensor_path = folder / PROJECTOR_DIR / file_name
  with tensor_path.open("w") as f:
    np.savetxt(f, x, fmt="%.7g", delimiter="\t")
  config = projector_config_pb2.ProjectorConfig()
  config_path = folder / PROJECTOR_CONFIG
  if config_path.exists():
    text_format.Parse(config_path.read_text(), config)
  kept = [e for e in config.embeddings if e.tensor_name != name]
  del config.embeddings[:]
  config.embeddings.extend(kept)
  entry = config.embeddings.add(tensor_name=name, tensor_path=f"{PROJECTOR_DIR}/{file_name}",
                                metadata_path=f"{PROJECTOR_DIR}/{METADATA_FILE}")
  entry.tensor_shape.extend(x.shape)
  if thumb:
    entry.sprite.image_path = f"{PROJECTOR_DIR}/{SPRITE_FILE}"
    entry.sprite.single_image_dim.extend([thumb, thumb])
  _replace(config_path, text_format.MessageToString(config))
  return tensor_path


def _replace(path: epath.Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


# ----------------------------------------------------------------------------- Neighbours


def query_indices(labels: np.ndarray, count: int, seed: int = SAMPLE_SEED) -> np.ndarray:
  """Up to `count` distinct queries: the first image of each class, classes in a seeded
  random order, then (fewer classes than queries) the second image of each, and so on."""
  labels = np.asarray(labels)
  count = min(count, len(labels))
  if count <= 0:
    return np.zeros((0,), np.int64)
  classes = np.unique(labels)
  order = np.random.default_rng(seed).permutation(len(classes))
  by_class = np.argsort(labels, kind="stable")
  starts = np.searchsorted(labels[by_class], classes)
  ends = np.append(starts[1:], len(labels))
  chosen, round_ = [], 0
  while len(chosen) < count:
    for c in order:
      if starts[c] + round_ < ends[c] and len(chosen) < count:
        chosen.append(by_class[starts[c] + round_])
    round_ += 1
  return np.asarray(chosen, np.int64)


def nearest(queries: np.ndarray, gallery: np.ndarray, k: int,
            exclude: np.ndarray | None = None) -> np.ndarray:
  """Each query's `k` nearest gallery rows by cosine similarity, nearest first (equal
  similarities: the lower index first), leaving out gallery row `exclude[q]` (-1: none)."""
  q = np.asarray(queries, np.float32)
  g = np.asarray(gallery, np.float32)  # not copied: a gallery may be large (Hotels-50K: 1M)
  q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
  sims = q @ g.T
  sims /= np.maximum(np.sqrt(np.einsum("ij,ij->i", g, g)), np.float32(1e-12))[None, :]
  if exclude is not None:
    rows = np.flatnonzero(np.asarray(exclude) >= 0)
    sims[rows, np.asarray(exclude)[rows]] = -np.inf
  k = min(k, len(g) - (0 if exclude is None else 1))
  return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def neighbour_sheet(query_images: Sequence[np.ndarray], query_labels: Sequence[int],
                    top: np.ndarray, gallery_images, gallery_labels: np.ndarray,
                    thumb: int = NEIGHBOURS_THUMB) -> np.ndarray:
  """uint8 (H, W, 3): per query a row, the query (blue) then its neighbours `top[q]`, green
  where the label is the query's, red where not. `gallery_images(indices)` gives images."""
  rows = []
  for image, label, neighbours in zip(query_images, query_labels, top):
    colors = sheets.neighbour_colors(int(label), np.asarray(gallery_labels)[neighbours])
    rows.append([(image, "query")] + list(zip(gallery_images(neighbours), colors)))
  return np.asarray(sheets.contact_sheet(rows, thumb))


# ----------------------------------------------------------------------------- images


def split_images(split, rows: np.ndarray, config: ml_collections.ConfigDict) -> list[np.ndarray]:
  """Images `rows` of a split as the evaluation saw them: its eval cache (the center crops,
  opened by the evaluation already), else the in-memory pixels, else decoded from the
  records (TensorFlow; only these rows)."""
  from hn_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  rows = np.asarray(rows, np.int64)
  cache = input_pipeline.cache_of(split, "eval", config)
  if cache is not None:
    return [cache.image(int(i)) for i in rows]
  if isinstance(split.images, np.ndarray):
    return [split.images[int(i)] for i in rows]
  from hn_jax.data import tf_pipeline  # pylint: disable=g-import-not-at-top
  return [tf_pipeline.decode_record(r).numpy() for r in split.images.read(rows)]


# ----------------------------------------------------------------------------- training


class RunSummaries:
  """The TensorBoard views of a training run beside its scalars (see the module doc).

  `config.projector_points` (0: none) caps the projector's test points; its tensors are
  written at the final evaluation, or at every one with `config.projector_every_eval`.
  `config.neighbour_queries` (0: none) test queries and their NEIGHBOURS_K nearest neighbours
  go to an image summary `<DATA>_test_neighbours` at every evaluation.
  """

  def __init__(self, config: ml_collections.ConfigDict, dataset, workdir: str | os.PathLike, *,
               enabled: bool = True):
    self.config, self.dataset = config, dataset
    self.folder = run_config.workdir_path(workdir)
    self.enabled = enabled
    self.points = int(config.get("projector_points", 0))
    self.every_eval = bool(config.get("projector_every_eval", False))
    self.queries = int(config.get("neighbour_queries", 0))
    self._points = self._queries = None
    self._thumb = None

  def started(self) -> None:
    if self.enabled:
      self._guarded(write_hparams, self.folder, self.config)

  def finished(self) -> None:
    if self.enabled:
      self._guarded(write_hparams, self.folder, self.config, finished=True)

  def evaluated(self, epoch: int, embeddings: Mapping[int, np.ndarray], writer, *,
                final: bool) -> None:
    """Writes the evaluation's views (the images through the CLU metric `writer`);
    `embeddings` maps id(split) to its embeddings."""
    if self.enabled:
      self._guarded(self._evaluated, epoch, embeddings, writer, final)

  def _guarded(self, fn, *args, **kwargs) -> None:
    """A full disk stops the run as the event files' does (errors.DiskFull, one line); any
    other view that cannot be written is a warning: the run goes on without it."""
    try:
      fn(*args, **kwargs)
    except OSError as e:
      if e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFull(f"no room for the TensorBoard views in {self.folder} (the checkpoints "
                       "are intact); free space there, then run the same command to "
                       "resume") from None
      logging.warning("TensorBoard views not written: %s", e)

  def _evaluated(self, epoch: int, embeddings: Mapping[int, np.ndarray], writer,
                 final: bool) -> None:
    test = embeddings.get(id(self.dataset.test))
    if test is None:
      return
    if self.points and (final or self.every_eval):
      self._projector(epoch, test)
    if self.queries:
      gallery = self.dataset.gallery
      gallery_embeddings = test if gallery is None else embeddings.get(id(gallery))
      if gallery_embeddings is not None:
        self._neighbours(epoch, test, gallery_embeddings, writer)

  def _projector(self, epoch: int, test: np.ndarray) -> None:
    split = self.dataset.test
    if self._points is None:
      self._points = sample_points(split.labels, self.points)
      columns = {"label": np.asarray(split.labels)[self._points], "index": self._points}
      self._thumb = sprite_thumb(len(self._points))
      images = split_images(split, self._points, self.config)
      write_projector_points(self.folder, columns, square_thumbnails(images, self._thumb))
    add_projector_tensor(self.folder, f"{self.dataset.key}_test_epoch_{epoch}",
                         test[self._points], self._thumb)

  def _neighbours(self, epoch: int, test: np.ndarray, gallery: np.ndarray, writer) -> None:
    split = self.dataset.test
    if self._queries is None:
      self._queries = query_indices(split.labels, self.queries)
    queries = self._queries
    gallery_split = self.dataset.gallery or split
    exclude = None if self.dataset.gallery is not None else queries
    top = nearest(test[queries], gallery, NEIGHBOURS_K, exclude)
    sheet = neighbour_sheet(split_images(split, queries, self.config),
                            np.asarray(split.labels)[queries], top,
                            lambda rows: split_images(gallery_split, rows, self.config),
                            gallery_split.labels)
    writer.write_images(epoch, {f"{self.dataset.key}_test_neighbours": sheet[None]})
