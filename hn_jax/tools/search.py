"""Nearest gallery images of query images, from an index that `hn_jax.tools.embed` wrote.

    python -m hn_jax.tools.search --index=INDEX.npz --query=IMAGE_OR_FOLDER [--query=...] --k=10 \
        [--sheet=OUT.png] [--workdir=RUN]
    python -m hn_jax.tools.search --index=INDEX.npz --query_split=test --query_indices=0,50,100 ...

Queries are image files (a folder: its jpg/jpeg/png files, sorted), embedded by the run
(`--workdir`, default the run recorded in the index); their labels are unknown. Or they are
images of a dataset split (`--query_split`, of `--query_dataset`, default the index's dataset
or else the run's, at `--query_indices`, default all): their labels are known. A missing or
unreadable query image is reported by name and skipped. A split query that the index holds
is its own nearest neighbour; `--exclude_self` leaves it out.

For each query, its k nearest gallery items (cosine, brute force with
`evaluation.top_k_indices`) are printed with their similarity, id and label (and chain, for
Hotels-50K). `--sheet` writes a contact sheet: one row per query, the query image then its k
nearest, as thumbnails of `--thumb` pixels in a frame of FRAME pixels. A neighbour is framed
green when its label equals the query's, red when not; the query is framed blue; where the
query's label is unknown, the neighbours are framed grey.

The queries must be embedded by the checkpoint that embedded the index (its digest is in
the index): another run, or another checkpoint of the same run, is refused unless
`--allow_other_checkpoint`. An index that is empty, inconsistent (as many labels and ids as
embeddings) or not finite is refused in one line; so is an existing `--sheet` without
`--overwrite`, and a run's own files always.
"""

from __future__ import annotations

import os
import sys
import zipfile
from typing import Sequence

import numpy as np
from absl import flags

from hn_jax import cli
from hn_jax.sheets import COLORS, FRAME, contact_sheet, neighbour_colors  # noqa: F401


class SearchError(ValueError):
  """A problem the command line reports in one line (no traceback)."""


def load_index(path: str) -> dict:
  """The arrays and strings of an index written by `hn_jax.tools.embed`."""
  if not os.path.isfile(path):
    raise SearchError(f"--index={path!r}: no such file")
  with open(path, "rb") as f:
    if f.read(4) != b"PK\x03\x04":
      raise SearchError(f"--index={path}: not a .npz index (not a zip archive: damaged, or "
                        "another kind of file); write it with python -m hn_jax.tools.embed")
  try:
    with np.load(path, allow_pickle=False) as data:
      index = {k: data[k] for k in data.files}
  except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
    reason = ("it holds pickled objects, which an index never does" if "pickle" in str(e)
              else f"{type(e).__name__}: {' '.join(str(e).split())[:200]}")
    raise SearchError(f"--index={path}: not a readable .npz index ({reason}); write it "
                      "again with python -m hn_jax.tools.embed") from None
  missing = [k for k in ("embeddings", "labels", "embedding_dim") if k not in index]
  if missing:
    raise SearchError(f"--index={path}: not an index of hn_jax.tools.embed (no "
                      f"{', '.join(missing)}); write it with python -m hn_jax.tools.embed")
  for key in ("source", "kind", "dataset", "split", "data_dir", "workdir", "checkpoint"):
    if key in index:
      index[key] = str(index[key])
  try:
    index["embedding_dim"] = int(index["embedding_dim"])
  except (TypeError, ValueError):
    raise SearchError(f"--index={path}: its embedding_dim is not a number; write it again "
                      "with python -m hn_jax.tools.embed") from None
  problem = _index_problem(index)
  if problem:
    raise SearchError(f"--index={path}: {problem}; write it again with python -m "
                      "hn_jax.tools.embed")
  return index


def _index_problem(index: dict) -> str | None:
  """What makes an index unusable: empty, inconsistent, not finite (None: nothing)."""
  embeddings = index["embeddings"]
  if embeddings.ndim != 2 or not np.issubdtype(embeddings.dtype, np.floating):
    return f"its embeddings are {embeddings.dtype} of shape {embeddings.shape}, not (N, D) floats"
  n, dim = embeddings.shape
  if n == 0:
    return "it holds no embedding (a gallery of 0 images)"
  if dim != index["embedding_dim"]:
    return f"its embeddings have dimension {dim} but it says {index['embedding_dim']}"
  for key in ("labels", "ids", "chains"):
    if key in index and (index[key].ndim != 1 or len(index[key]) != n):
      return f"it holds {n} embeddings but {index[key].size} {key}"
  if index.get("kind") not in (None, "dataset", "folder"):
    return f"its kind {index['kind']!r} is neither dataset nor folder"
  if "ids" not in index and index.get("kind") == "folder":
    return "it holds folder images without their paths (ids)"
  if not np.isfinite(embeddings).all():
    bad = int((~np.isfinite(embeddings).all(axis=1)).sum())
    return f"{bad} of its {n} embeddings are not finite"
  return None


def check_checkpoint(index: dict, state, index_path: str, workdir: str, allow_other: bool,
                     warn) -> None:
  """Refuses queries embedded by another checkpoint than the index's (unless `allow_other`)."""
  from hn_jax import checkpoints  # pylint: disable=g-import-not-at-top
  recorded = index.get("checkpoint")
  if not recorded:
    warn(f"the index {index_path} does not record the checkpoint that embedded it (written "
         "by an older hn_jax): queries are embedded by the newest checkpoint of "
         f"{workdir}, unchecked")
    return
  have = checkpoints.state_id(state)
  if have == recorded:
    return
  message = (f"the index {index_path} was embedded by checkpoint {recorded[:12]} (of "
             f"{index.get('workdir') or 'an unrecorded run'}) but {workdir}'s newest good "
             f"checkpoint is {have[:12]}: query and gallery embeddings would not be comparable")
  if not allow_other:
    raise SearchError(f"{message}; embed the gallery again with this checkpoint, or give "
                      "--allow_other_checkpoint to search anyway")
  warn(f"{message}; searching anyway (--allow_other_checkpoint)")


def check_dimension(index: dict, config, index_path: str, workdir: str) -> None:
  if index["embedding_dim"] != int(config.embedding_dim) or \
      index["embeddings"].shape[1] != int(config.embedding_dim):
    raise SearchError(
        f"the index {index_path} holds embeddings of dimension {index['embeddings'].shape[1]} "
        f"but the run {workdir} embeds in dimension {config.embedding_dim}; embed the gallery "
        "with the same run (python -m hn_jax.tools.embed)")


def nearest(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(indices (Q, k) nearest first, their cosine similarities) of each query."""
  from hn_jax import evaluation  # pylint: disable=g-import-not-at-top
  k = min(int(k), len(gallery))
  top = evaluation.top_k_indices(queries, gallery, k)
  q = np.asarray(evaluation.l2_normalize(queries))
  g = np.asarray(evaluation.l2_normalize(gallery))
  sims = np.einsum("qd,qkd->qk", q, g[top])
  return top, sims


def _without_self(top: np.ndarray, sims: np.ndarray, selves: np.ndarray,
                  k: int) -> tuple[np.ndarray, np.ndarray]:
  """Each row's first k entries other than the query's own gallery index (-1: none)."""
  keep = top != selves[:, None]
  order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(top, order, 1), np.take_along_axis(sims, order, 1)


class Gallery:
  """Reads the index's images back: from file paths, or through its dataset split."""

  def __init__(self, index: dict, config):
    self.index = index
    self._split = None
    self._config = config

  def image(self, i: int) -> np.ndarray:
    from hn_jax.tools import embed  # pylint: disable=g-import-not-at-top
    if self.index["kind"] == "folder":
      image = embed.read_image(str(self.index["ids"][i]))
      return np.zeros((8, 8, 3), np.uint8) if image is None else image
    if self._split is None:
      data_config = embed.dataset_config(self._config, self.index["dataset"],
                                         self.index["data_dir"] or None)
      self._split = embed.get_split(data_config, self.index["split"])
    return embed.split_image(self._split, i)


def _describe(index: dict, i: int) -> str:
  text = f"id {index['ids'][i]}  label {int(index['labels'][i])}"
  if "chains" in index:
    text += f"  chain {int(index['chains'][i])}"
  return text


def _query_paths(queries: Sequence[str]) -> list[str]:
  from hn_jax.tools import embed  # pylint: disable=g-import-not-at-top
  paths = []
  for query in queries:
    if os.path.isdir(query):
      paths.extend(embed.list_images(query))
    elif os.path.exists(query):
      paths.append(query)
    else:
      embed.warn(f"skipped {query}: no such file")
  return paths


def search(index_path: str, *, queries: Sequence[str] = (), query_split: str | None = None,
           query_dataset: str | None = None, query_indices: Sequence[int] | None = None,
           k: int = 10, sheet: str | None = None, workdir: str | None = None,
           thumb: int = 96, exclude_self: bool = False, out=None, overwrite: bool = False,
           allow_other_checkpoint: bool = False) -> dict:
  """Runs a search (see the module doc); prints to `out` (default stdout).

  Returns {"ids", "labels", "top", "sims", "images"} of the queries kept.
  """
  from hn_jax.tools import embed  # pylint: disable=g-import-not-at-top
  from hn_jax import output_files  # pylint: disable=g-import-not-at-top
  out = sys.stdout if out is None else out
  if sheet:
    try:
      output_files.check(sheet, "--sheet", overwrite=overwrite)
    except output_files.OutputRefused as e:
      raise SearchError(str(e)) from None
  index = load_index(index_path)
  workdir = workdir or index.get("workdir")
  if not workdir:
    raise SearchError(f"the index {index_path} records no run: give --workdir")
  from hn_jax import run_config  # pylint: disable=g-import-not-at-top
  try:
    config = run_config.read(workdir)
  except run_config.ConfigError as e:
    raise SearchError(str(e)) from e
  check_dimension(index, config, index_path, workdir)
  config, graphdef, state, mesh = embed.load_run(workdir)
  check_checkpoint(index, state, index_path, workdir, allow_other_checkpoint, embed.warn)

  ids, labels, images, selves = [], [], [], []
  if query_split is not None:
    name = query_dataset or (index["dataset"] if index["kind"] == "dataset" else None)
    data_config = embed.dataset_config(config, name, index.get("data_dir") or None)
    split = embed.get_split(data_config, query_split)
    chosen = range(len(split)) if query_indices is None else list(query_indices)
    in_index = (index["kind"] == "dataset" and index["dataset"] == data_config.dataset
                and index["split"] == query_split)
    for i in chosen:
      if not 0 <= i < len(split):
        embed.warn(f"skipped query index {i}: the {query_split} split has {len(split)} images")
        continue
      ids.append(f"{data_config.dataset}:{query_split}:{i}")
      labels.append(int(split.labels[i]))
      images.append(embed.split_image(split, i))
      selves.append(i if in_index else -1)
  paths, pixels = embed.read_images(_query_paths(queries))
  ids += paths
  labels += [None] * len(paths)
  images += pixels
  selves += [-1] * len(paths)
  if not images:
    raise SearchError("no query image left to search with")

  query_embeddings = embed._embedding(  # pylint: disable=protected-access
      embed.embed_images, config, graphdef, state, mesh, images, progress=False)
  embed.check_finite(query_embeddings, ids, "queries")
  if exclude_self:
    top, sims = _without_self(*nearest(query_embeddings, index["embeddings"], k + 1),
                              np.asarray(selves), min(k, len(index["embeddings"]) - 1))
  else:
    top, sims = nearest(query_embeddings, index["embeddings"], k)
  rows = []
  gallery = Gallery(index, config) if sheet else None
  for q, (query_id, label) in enumerate(zip(ids, labels)):
    known = "unknown label" if label is None else f"label {label}"
    print(f"query {query_id} ({known}):", file=out)
    row = [(images[q], "query")]
    for rank, (g, s) in enumerate(zip(top[q], sims[q]), 1):
      g = int(g)
      mark = "" if label is None else ("  correct" if int(index["labels"][g]) == label else "")
      print(f"  {rank:3d}. {s:+.4f}  {_describe(index, g)}{mark}", file=out)
      if gallery is not None:
        (color,) = neighbour_colors(label, [index["labels"][g]])
        row.append((gallery.image(g), color))
    rows.append(row)
  if sheet:
    picture = contact_sheet(rows, thumb)
    try:
      output_files.write(sheet, "--sheet", lambda f: picture.save(f, format="PNG"))
    except output_files.OutputRefused as e:
      raise SearchError(str(e)) from None
    print(f"wrote {sheet}", file=out)
  return {"ids": ids, "labels": labels, "top": top, "sims": sims, "images": images,
          "embeddings": query_embeddings}


PROG = "hn_jax.tools.search"
FLAGS = cli.command_flags()
flags.DEFINE_string("index", None, "The .npz of hn_jax.tools.embed.", flag_values=FLAGS)
flags.DEFINE_multi_string("query", [], "A query image or a folder of them (repeatable).",
                          flag_values=FLAGS)
flags.DEFINE_string("query_split", None,
                    "Queries from this split (train, test, gallery) of a dataset.",
                    flag_values=FLAGS)
flags.DEFINE_string("query_dataset", None,
                    "Dataset of --query_split (default: the index's, else the run's).",
                    flag_values=FLAGS)
flags.DEFINE_list("query_indices", None, "Comma-separated indices into --query_split "
                  "(default: all).", flag_values=FLAGS)
flags.DEFINE_integer("k", 10, "Neighbours per query.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_string("sheet", None, "Write a contact sheet PNG here.", flag_values=FLAGS)
flags.DEFINE_integer("thumb", 96, "Thumbnail size in pixels.", flag_values=FLAGS)
flags.DEFINE_bool("exclude_self", False, "Leave a --query_split query out of its own "
                  "neighbours when the index holds that split.", flag_values=FLAGS)
flags.DEFINE_string("workdir", None, "The run that embeds the queries (default: the index's).",
                    flag_values=FLAGS)
flags.DEFINE_bool("allow_other_checkpoint", False, "Embed the queries with another checkpoint "
                  "than the one that embedded the index (their embeddings may not compare).",
                  flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Replace --sheet if it exists (a run's own files never).",
                  flag_values=FLAGS)


def _search(_: list[str]) -> None:
  if not FLAGS.query and FLAGS.query_split is None:
    raise SearchError("give --query (image or folder) or --query_split")
  try:
    indices = (None if FLAGS.query_indices is None
               else [int(i) for i in FLAGS.query_indices if i.strip()])
  except ValueError as e:
    raise SearchError(f"--query_indices={','.join(FLAGS.query_indices)!r}: give integers "
                      "separated by commas") from e
  load_index(FLAGS.index)  # a bad index is refused before the heavy imports
  # TensorFlow (for records of prepared datasets only) is kept off the GPUs by hn_jax.cli.
  from hn_jax.tools import embed  # pylint: disable=g-import-not-at-top
  try:
    search(FLAGS.index, queries=FLAGS.query, query_split=FLAGS.query_split,
           query_dataset=FLAGS.query_dataset, query_indices=indices, k=FLAGS.k,
           sheet=FLAGS.sheet, workdir=FLAGS.workdir, thumb=FLAGS.thumb,
           exclude_self=FLAGS.exclude_self, overwrite=FLAGS.overwrite,
           allow_other_checkpoint=FLAGS.allow_other_checkpoint)
  except embed.EmbedError as e:
    raise SearchError(str(e)) from e


def main(argv: Sequence[str] | None = None) -> int:
  """The command line (without the program name); returns the exit status."""
  return cli.run(_search, FLAGS, argv, prog=PROG, doc=__doc__, required=("index",),
                 errors=(SearchError,))


if __name__ == "__main__":
  sys.exit(main())
