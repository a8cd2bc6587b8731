"""Embeds images with a trained run: a dataset split, or a folder of image files, to `.npz`.

    python -m hn_jax.tools.embed --workdir=RUN --split=test --out=test.npz [--dataset=NAME]
    python -m hn_jax.tools.embed --workdir=RUN --images=FOLDER --out=folder.npz

The run's `config.json` and latest checkpoint give the model; images go through the eval
transform of the input pipeline (resize the shorter side, center crop; the embed step
normalizes), in batches of `config.eval_batch_size` (the last one padded), sharded over
every device by the training's embed step. A dataset split is read from the decoded-image
cache that training left (`config.cache`), so it decodes nothing again. The `.npz` holds:

  embeddings     float32 (N, D), L2-normalized
  ids            str (N,): the image_id of prepared data, the file path of a folder image,
                 else the index in the split
  labels         int64 (N,), -1 for folder images
  chains         int64 (N,), only for splits with chains (Hotels-50K)
  embedding_dim  int
  source         str, e.g. "dataset digits, split test" or "folder /path"
  kind           "dataset" or "folder"; dataset, split, data_dir: where the images are
  workdir        the run that embedded them (hn_jax.tools.search uses it to embed queries)
  checkpoint     the digest of the checkpoint that embedded them (`checkpoints.state_id`);
                 search refuses to embed queries with another one
  checkpoint_step  its step

The `.npz` is written to a temporary file, then renamed: never left truncated. An existing
`--out` is refused unless `--overwrite` is given, and a run's own files (config.json, anything
under checkpoints/, ...) always are. Embeddings that are not finite (a checkpoint of a run
that diverged) are refused, not written.

Folder images: .jpg, .jpeg, .png (any case), sorted by path, decoded by PIL to RGB; an
unreadable one is reported on stderr (one line, naming it) and skipped. Single process.

`--projector=DIR` also writes the embeddings for TensorBoard's projector
(`tensorboard --logdir=DIR`, docs/tensorboard.md): at most `--projector_points` of them
(default: the run's config.projector_points), whole classes in a seeded order for a split
(`hn_jax.summaries.sample_points`), the first ones for a folder; with their labels, ids and
a sprite of thumbnails. Another index written to the same DIR is added beside it when it
holds the same points, and replaces it when not. DIR gets an event file of no summary
(`projector.tfevents.*`, which `hn_jax.tools.report` passes over), so that it is a TensorBoard
run under a parent log dir too.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import ml_collections
import numpy as np
from absl import flags

from hn_jax import checkpoints, cli, errors, evaluation, evaluators, output_files, run_config
from hn_jax import summaries, train_step
from hn_jax.data import datasets, image_cache
from hn_jax.data.splits import Split

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
PROG = "hn_jax.tools.embed"


class EmbedError(ValueError):
  """A problem the command line reports in one line (no traceback)."""


def load_run(workdir: str, mesh=None):
  """(config, graphdef, state, mesh) of the latest checkpoint of the run in `workdir`."""
  try:
    return checkpoints.restore_run(workdir, mesh)
  except (run_config.ConfigError, checkpoints.NoCheckpoint) as e:
    raise EmbedError(str(e)) from e


def check_finite(embeddings: np.ndarray, ids, what: str) -> None:
  """EmbedError, one line, if any embedding is not finite (a run that diverged)."""
  bad = ~np.isfinite(embeddings).all(axis=1)
  if bad.any():
    first = ids[int(np.argmax(bad))] if len(ids) else int(np.argmax(bad))
    raise EmbedError(f"{int(bad.sum())} of {len(bad)} {what} embed to values that are not "
                     f"finite (first: {first}): the run's checkpoint is not usable (did its "
                     "training diverge?); embed with another run")


def _embedding(fn, *args, **kwargs) -> np.ndarray:
  """fn(*args, **kwargs); running out of memory there is one line naming the batch size."""
  try:
    return fn(*args, **kwargs)
  except Exception as e:  # pylint: disable=broad-except; XLA's errors have no common type
    if errors.is_out_of_memory(e):
      raise EmbedError("out of memory while embedding; lower the batch with --eval_batch_size "
                       "(default: the run's config.eval_batch_size)") from None
    raise


_EMBED_STEPS: dict = {}


def _embed_step(graphdef, mesh, config):
  key = (id(graphdef), id(mesh), tuple(config.mean), tuple(config.std))
  if key not in _EMBED_STEPS:
    _EMBED_STEPS[key] = (graphdef, mesh, train_step.make_embed_step(graphdef, mesh, config))
  return _EMBED_STEPS[key][2]


def _normalized(embeddings: np.ndarray) -> np.ndarray:
  return np.asarray(evaluation.l2_normalize(embeddings), np.float32)


def embed_split(config: ml_collections.ConfigDict, graphdef, state, mesh, split: Split, *,
                progress: bool = True) -> np.ndarray:
  """L2-normalized float32 embeddings of a dataset split, in its order."""
  step = _embed_step(graphdef, mesh, config)
  return _normalized(evaluators.embed_split(step, state, split, config, mesh, progress=progress))


def embed_images(config: ml_collections.ConfigDict, graphdef, state, mesh,
                 images: Sequence[np.ndarray], *, progress: bool = True) -> np.ndarray:
  """L2-normalized float32 embeddings of uint8 RGB images (H, W, 3), of any sizes.

  Each is resized and center-cropped as the eval cache of an in-memory split is
  (`image_cache.transform`, NumPy), so a folder image and the same image of such a split
  embed alike.
  """
  size, batch = config.image_size, config.eval_batch_size
  n = len(images)

  def image_batches():
    for start in range(0, n, batch):
      chunk = np.zeros((batch, size, size, 3), np.uint8)
      for i, image in enumerate(images[start:start + batch]):
        chunk[i] = image_cache.transform(np.asarray(image, np.uint8), "eval", size)
      yield chunk

  step = _embed_step(graphdef, mesh, config)
  return _normalized(evaluators.embed_batches(step, state, image_batches(), n, mesh,
                                              progress=progress, total=-(-n // batch)))


def warn(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr, flush=True)


def read_image(path: str) -> np.ndarray | None:
  """The image file at `path` as uint8 RGB (H, W, 3); None (with a warning) if unreadable."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as image:
      image.load()
      return np.asarray(image.convert("RGB"), np.uint8)
  except MemoryError:
    raise EmbedError(f"out of memory reading {path}; embed fewer or smaller images at once "
                     "(a folder of them at a time)") from None
  except FileNotFoundError:
    warn(f"skipped {path}: no such file")
  except Exception as e:  # pylint: disable=broad-except
    warn(f"skipped {path}: cannot read it as an image ({type(e).__name__}: {e})")
  return None


def list_images(folder: str) -> list[str]:
  """The image files (jpg, jpeg, png, any case) under `folder`, recursively, sorted."""
  paths = []
  for root, _, files in os.walk(folder):
    paths.extend(os.path.join(root, f) for f in files
                 if f.lower().endswith(IMAGE_EXTENSIONS))
  return sorted(paths)


def read_images(paths: Sequence[str]) -> tuple[list[str], list[np.ndarray]]:
  """(paths read, their images): the unreadable ones reported and left out."""
  kept, images = [], []
  for path in paths:
    image = read_image(path)
    if image is not None:
      kept.append(path)
      images.append(image)
  return kept, images


def dataset_config(config: ml_collections.ConfigDict, dataset: str | None,
                   data_dir: str | None) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict(config.to_dict())
  if dataset:
    out.dataset = dataset
  if data_dir is not None:
    out.data_dir = data_dir
  return out


# Dataset attribute -> the prepared split that holds it, where the names differ.
_PREPARED_SPLITS = {("inshop", "test"): "query", ("hotels50k", "gallery"): "train"}


def get_split(config: ml_collections.ConfigDict, split: str) -> Split:
  """`split` (train, test or gallery) of `config.dataset`."""
  if split not in ("train", "test", "gallery"):
    raise EmbedError(f"--split={split!r}: use train, test or gallery")
  try:
    dataset = datasets.load(config)
  except datasets.DataNotPreparedError as e:
    raise EmbedError(str(e)) from e
  result = getattr(dataset, split)
  if result is None:
    raise EmbedError(f"dataset {config.dataset} has no {split} split (its gallery is the "
                     "test split)")
  return result


def split_ids(config: ml_collections.ConfigDict, split: str, n: int) -> np.ndarray:
  """The image_ids of a prepared split (from its metadata), else the indices as strings."""
  if config.dataset in datasets.PREPARED or config.dataset == datasets.FOLDER:
    try:
      from hn_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
      builder = tfds_builders.BUILDERS[config.dataset](data_dir=datasets.prepared_root(config))
      name = _PREPARED_SPLITS.get((config.dataset, split), split)
      ids = builder.info.metadata["splits"][name]["image_ids"]
      if len(ids) == n:
        return np.asarray(ids, dtype=str)
    except Exception:  # pylint: disable=broad-except
      pass
  return np.asarray([str(i) for i in range(n)], dtype=str)


def split_image(split: Split, index: int) -> np.ndarray:
  """Image `index` of a split as uint8 RGB (H, W, 3), from memory or its records."""
  if isinstance(split.images, np.ndarray):
    return np.asarray(split.images[index], np.uint8)
  from hn_jax.data import tf_pipeline  # pylint: disable=g-import-not-at-top
  (record,) = split.images.read([int(index)])
  return tf_pipeline.decode_record(record).numpy()


def embed_to_file(workdir: str, out: str | None, *, dataset: str | None = None,
                  split: str | None = None, images: str | None = None,
                  data_dir: str | None = None, progress: bool = True, overwrite: bool = False,
                  eval_batch_size: int | None = None, projector: str | None = None,
                  projector_points: int | None = None) -> dict:
  """Embeds a dataset split or an image folder with the run in `workdir`; writes `out` (and
  the projector's files to `projector`; see the module doc)."""
  if out is None and projector is None:
    raise EmbedError("give --out (an .npz) or --projector (a folder), or both")
  if projector_points is not None and projector_points < 1:
    raise EmbedError(f"--projector_points={projector_points}: give a positive number")
  if (images is None) == (split is None):
    raise EmbedError("give either --split (with --dataset, default the run's) or --images")
  if images is not None and not os.path.isdir(images):
    raise EmbedError(f"--images={images!r}: no such folder")
  try:
    if out is not None:
      output_files.check(out, "--out", overwrite=overwrite)
    if projector is not None and output_files.bookkeeping(projector) is not None:
      raise output_files.OutputRefused(f"--projector={projector} is "
                                       f"{output_files.bookkeeping(projector)}; write elsewhere")
  except output_files.OutputRefused as e:
    raise EmbedError(str(e)) from None
  config, graphdef, state, mesh = load_run(workdir)
  if eval_batch_size:
    if eval_batch_size % mesh.size:
      raise EmbedError(f"--eval_batch_size={eval_batch_size} is not divisible by the "
                       f"{mesh.size} devices; use a multiple of {mesh.size}")
    config = ml_collections.ConfigDict(config.to_dict())
    config.eval_batch_size = eval_batch_size
  record = {"workdir": os.fspath(run_config.workdir_path(workdir)),
            "embedding_dim": int(config.embedding_dim),
            "checkpoint": checkpoints.state_id(state),
            "checkpoint_step": int(state.step) if hasattr(state, "step") else -1}
  if images is not None:
    paths, pixels = read_images(list_images(images))
    if not paths:
      raise EmbedError(f"no readable image (jpg, jpeg, png) in {images}")
    embeddings = _embedding(embed_images, config, graphdef, state, mesh, pixels,
                            progress=progress)
    check_finite(embeddings, paths, "images")
    record.update(embeddings=embeddings, ids=np.asarray(paths, dtype=str),
                  labels=np.full(len(paths), -1, np.int64), kind="folder",
                  source=f"folder {os.path.abspath(images)}", dataset="", split="",
                  data_dir="")
  else:
    data_config = dataset_config(config, dataset, data_dir)
    the_split = get_split(data_config, split)
    if len(the_split) == 0:
      raise EmbedError(f"the {split} split of {data_config.dataset} holds no image: nothing "
                       "to embed")
    embeddings = _embedding(embed_split, data_config, graphdef, state, mesh, the_split,
                            progress=progress)
    check_finite(embeddings, range(len(embeddings)), f"images of the {split} split")
    record.update(embeddings=embeddings, ids=split_ids(data_config, split, len(the_split)),
                  labels=np.asarray(the_split.labels, np.int64), kind="dataset",
                  source=f"dataset {data_config.dataset}, split {split}",
                  dataset=data_config.dataset, split=split,
                  data_dir=datasets.data_dir(data_config))
    if the_split.chains is not None:
      record["chains"] = np.asarray(the_split.chains, np.int64)
  if projector is not None:
    cap = projector_points or int(config.get("projector_points", 0)) or 2000
    if images is not None:
      write_projector(projector, record, cap, lambda rows: [pixels[int(i)] for i in rows])
    else:
      write_projector(projector, record, cap,
                      lambda rows: summaries.split_images(the_split, rows, data_config))
  if out is not None:
    try:
      output_files.write(out, "--out", lambda f: np.savez(f, **record))
    except output_files.OutputRefused as e:
      raise EmbedError(str(e)) from None
  return record


def write_projector(folder: str, record: dict, cap: int, images) -> None:
  """The projector files of an embedded `record` in `folder` (`hn_jax.summaries`): at most
  `cap` points, their label, index and id, thumbnails of `images(indices)`."""
  rows = (summaries.sample_points(record["labels"], cap) if record["kind"] == "dataset"
          else np.arange(min(cap, len(record["labels"]))))
  columns = {"label": record["labels"][rows], "index": rows, "id": record["ids"][rows]}
  thumb = summaries.sprite_thumb(len(rows))
  summaries.write_projector_points(folder, columns,
                                   summaries.square_thumbnails(images(rows), thumb))
  name = (f"{record['dataset']}_{record['split']}" if record["kind"] == "dataset"
          else f"folder_{os.path.basename(os.path.normpath(record['source'].split(' ', 1)[1]))}")
  summaries.add_projector_tensor(folder, name, record["embeddings"][rows], thumb)
  summaries.mark_run(folder)


FLAGS = cli.command_flags()
flags.DEFINE_string("workdir", None, "The training run (config.json, checkpoints).",
                    flag_values=FLAGS)
flags.DEFINE_string("dataset", None, "Dataset name (default: the run's).", flag_values=FLAGS)
flags.DEFINE_string("split", None, "train, test or gallery.", flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "Prepared data (default: the run's).", flag_values=FLAGS)
flags.DEFINE_string("images", None, "A folder of jpg/jpeg/png images instead.",
                    flag_values=FLAGS)
flags.DEFINE_string("out", None, "The .npz to write.", flag_values=FLAGS)
flags.DEFINE_string("projector", None, "Also write TensorBoard projector files to this "
                    "folder (tensorboard --logdir=FOLDER).", flag_values=FLAGS)
flags.DEFINE_integer("projector_points", None, "At most this many points in the projector "
                     "(default: the run's config.projector_points).", flag_values=FLAGS)
flags.DEFINE_bool("progress", True, "A progress bar on stderr (--noprogress: none).",
                  flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Replace --out if it exists (a run's own files never).",
                  flag_values=FLAGS)
flags.DEFINE_integer("eval_batch_size", None, "Images per batch (default: the run's "
                     "config.eval_batch_size); lower it if memory runs out.", lower_bound=1,
                     flag_values=FLAGS)


def _embed(_: list[str]) -> None:
  if "tensorflow" in sys.modules:  # keep TensorFlow off the accelerator, if anything loaded it
    sys.modules["tensorflow"].config.set_visible_devices([], "GPU")
  record = embed_to_file(FLAGS.workdir, FLAGS.out, dataset=FLAGS.dataset, split=FLAGS.split,
                         images=FLAGS.images, data_dir=FLAGS.data_dir, progress=FLAGS.progress,
                         projector=FLAGS.projector, projector_points=FLAGS.projector_points,
                         overwrite=FLAGS.overwrite, eval_batch_size=FLAGS.eval_batch_size)
  where = ", ".join(w for w in (FLAGS.out, FLAGS.projector and
                                f"projector files in {FLAGS.projector}") if w)
  print(f"{where}: {len(record['ids'])} embeddings of dimension {record['embedding_dim']} "
        f"({record['source']})")


def main(argv: Sequence[str] | None = None) -> int:
  """The command line (without the program name); returns the exit status."""
  return cli.run(_embed, FLAGS, argv, prog=PROG, doc=__doc__, required=("workdir",),
                 errors=(EmbedError,))


if __name__ == "__main__":
  sys.exit(main())
