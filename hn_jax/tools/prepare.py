"""Builds a benchmark's TFDS dataset, once, from the published layout a user already has.

  python -m hn_jax.tools.prepare --dataset=cub --manual_dir=/data/CUB_200_2011 --data_dir=/data/tfds

reads the layout in `manual_dir` (each dataset's layout and expected counts are in
docs/datasets.md; the readers are in `hn_jax/data/tfds_builders/`), checks every
image, and writes ArrayRecord files (random access by index, which the samplers need) under
`data_dir/hn_<dataset>/<version>/`. It ends with a summary: images written per split,
classes, files skipped and why; the same summary is saved there as `prepare_report.txt`.
Nothing is downloaded: TFDS is told to use the manual folder only.

`--dataset=folder --manual_dir=DIR_OR_CSV` prepares one's own images (docs/folder.md) into
their own folder under `data_dir` (default `~/.cache/hn_jax/datasets`); training on them
(configs/folder.py) does this by itself on first use.

One prepare of a dataset at a time: a lock (`run_lock`, `data_dir/hn_<dataset>/prepare.lock`)
refuses a second one in one line, and what a killed one left (TFDS's `incomplete.*` folders,
a half-done rebuild) is cleaned up when the next one starts. `--overwrite` reads the new
layout first and builds the new copy beside the old one, which it replaces only once the
build succeeded: a wrong `--manual_dir`, a full disk or a crash leave the prepared copy as
it was.
"""

from __future__ import annotations

import collections
import errno
import os
import shutil
import sys
from typing import Sequence

from absl import flags, logging

from hn_jax import cli

PROG = "hn_jax.tools.prepare"
FLAGS = cli.command_flags()
flags.DEFINE_string("dataset", None, "One of: cub, cars, sop, inshop, hotels50k, or folder "
                    "(one's own images, docs/folder.md).", flag_values=FLAGS)
flags.DEFINE_string("manual_dir", None, "Folder of the published layout, as downloaded (see "
                    "docs/datasets.md); for --dataset=folder, the folder of class folders or "
                    "the CSV file.", flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "Where prepared datasets live; default $HN_DATA_DIR "
                    "(folder: else ~/.cache/hn_jax/datasets).", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Rebuild even if the dataset is already prepared (the "
                  "prepared copy is replaced only once the new one is built).",
                  flag_values=FLAGS)
flags.DEFINE_integer("workers", None, "Threads checking images (default: 2 per core, <= 32).",
                     flag_values=FLAGS)

ALIASES = {"car": "cars", "hotel": "hotels50k", "hotels": "hotels50k"}
REPORT_FILE = "prepare_report.txt"
_EXAMPLES_PER_REASON = 10  # skipped paths printed per reason; the report file has them all


class PrepareError(ValueError):
  """What stops a build; its message is one line naming the problem."""


def canonical_name(dataset: str) -> str:
  from hn_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
  name = ALIASES.get(dataset, dataset)
  if name not in tfds_builders.BUILDERS:
    raise PrepareError(f"unknown dataset {dataset!r}; use one of "
                       f"{', '.join(tfds_builders.BUILDERS)}")
  return name


def summary(builder, *, full: bool = False) -> str:
  """Images per split, classes, skipped files by reason, conversions and warnings."""
  info, metadata = builder.info, builder.info.metadata
  lines = [f"{builder.name} {builder.version} in {builder.data_dir} (from {metadata['root']})"]
  for split, table in metadata["splits"].items():
    lines.append(f"  {split}: {len(table['labels'])} images, {len(set(table['labels']))} "
                 "classes" + (f", {sum(c >= 0 for c in table['chains'])} of a known chain"
                              if "chains" in table else ""))
    assert info.splits[split].num_examples == len(table["labels"])
  limit = None if full else _EXAMPLES_PER_REASON
  for title, items in (("skipped", metadata["skipped"]), ("converted", metadata["converted"]),
                       ("warnings", metadata["warnings"])):
    if not items:
      if title == "skipped":
        lines.append("  skipped: none")
      continue
    by_reason = collections.defaultdict(list)
    for where, reason in items:
      by_reason[reason.split(" (")[0]].append((where, reason))
    lines.append(f"  {title}: {len(items)}")
    for key, group in by_reason.items():
      lines.append(f"    {key}: {len(group)}")
      for where, reason in group[:limit]:
        lines.append(f"      {where}" + (f": {reason}" if reason != key else ""))
      if limit is not None and len(group) > limit:
        lines.append(f"      ... {len(group) - limit} more in {builder.data_dir}/{REPORT_FILE}")
  return "\n".join(lines)


def one_line(builder) -> str:
  """The summary in one line: images and classes per split, skipped files (a few named)."""
  metadata = builder.info.metadata
  splits = ", ".join(f"{split} {len(t['labels'])} images of {len(set(t['labels']))} classes"
                     for split, t in metadata["splits"].items())
  skipped = metadata["skipped"]
  line = f"{builder.name} in {builder.data_dir}: {splits}; skipped {len(skipped)} file(s)"
  if skipped:
    named = ", ".join(f"{os.path.basename(where)} ({reason})" for where, reason in skipped[:3])
    more = f", ... ({len(skipped) - 3} more)" if len(skipped) > 3 else ""
    line += f" that could not be read: {named}{more}; all in {builder.data_dir}/{REPORT_FILE}"
  return line


def prepare(dataset: str, manual_dir: str, data_dir: str, *, overwrite: bool = False,
            workers: int | None = None, progress: bool = True):
  """Builds `dataset` from `manual_dir` into `data_dir`; returns the TFDS builder.

  For `folder` (one's own images), `manual_dir` is the folder or CSV file, and the copy goes
  to its own folder under `data_dir` (`datasets.folder_dir`; data_dir "": the default cache).
  """
  from hn_jax.data import datasets, tfds_builders  # pylint: disable=g-import-not-at-top

  name = canonical_name(dataset)
  if not manual_dir:
    raise PrepareError(f"--manual_dir is required: the folder of the published layout "
                       f"({tfds_builders.BUILDERS[name].MANUAL_DOWNLOAD_INSTRUCTIONS.strip()})")
  if not (os.path.isdir(manual_dir) or (name == datasets.FOLDER and os.path.isfile(manual_dir))):
    raise PrepareError(f"missing folder {manual_dir}; expected "
                       f"{tfds_builders.BUILDERS[name].MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}")
  if name == datasets.FOLDER:
    data_dir = datasets.folder_dir(datasets.folder_root(data_dir), manual_dir)
  if not data_dir:
    raise PrepareError("--data_dir (or the HN_DATA_DIR environment variable) is required: "
                       "where to write the prepared dataset")
  builder_cls = tfds_builders.BUILDERS[name]
  builder = builder_cls(data_dir=data_dir, file_format="array_record")
  folder = os.path.dirname(builder.data_dir)  # data_dir/hn_<name>: its versions
  from hn_jax import run_lock  # pylint: disable=g-import-not-at-top
  from hn_jax.errors import RunStopped  # pylint: disable=g-import-not-at-top
  try:
    with run_lock.WorkdirLock(folder, lock_file=LOCK_FILE, what=f"prepare of {name}"):
      _clean_leftovers(folder, os.path.basename(builder.data_dir))
      builder = builder_cls(data_dir=data_dir, file_format="array_record")
      if builder.is_prepared() and not overwrite:
        return builder
      if builder.is_prepared():
        # The new layout is read before anything of the old copy is touched.
        builder_cls(data_dir=data_dir).check_layout(manual_dir)
        scratch = os.path.join(folder, f"{REBUILD_PREFIX}{os.getpid()}")
        try:
          built = _build(builder_cls, name, manual_dir, scratch, workers, progress,
                         shown_dir=data_dir)
          _replace(os.path.join(scratch, os.path.basename(folder),
                                os.path.basename(builder.data_dir)), builder.data_dir)
        finally:
          shutil.rmtree(scratch, ignore_errors=True)
        fresh = builder_cls(data_dir=data_dir, file_format="array_record")
        fresh.progress = built.progress
        return fresh
      return _build(builder_cls, name, manual_dir, data_dir, workers, progress)
  except RunStopped as e:
    raise PrepareError(str(e)) from None


LOCK_FILE = "prepare.lock"
REBUILD_PREFIX = "rebuild-"  # data_dir/hn_<name>/rebuild-PID: an --overwrite's new copy
_OLD_SUFFIX = ".old-"  # data_dir/hn_<name>/VERSION.old-PID: the copy an --overwrite replaces


def _clean_leftovers(folder: str, version: str) -> None:
  """Removes what a killed prepare of this dataset left (the caller holds its lock)."""
  if not os.path.isdir(folder):
    return
  final = os.path.join(folder, version)
  for entry in sorted(os.listdir(folder)):
    path = os.path.join(folder, entry)
    if entry.startswith(f"{version}{_OLD_SUFFIX}"):
      if not os.path.exists(final):  # killed between the two renames of a rebuild
        os.rename(path, final)
        logging.warning("restored %s, which a killed --overwrite had moved aside", final)
      else:
        shutil.rmtree(path, ignore_errors=True)
    elif entry.startswith("incomplete.") or entry.startswith(REBUILD_PREFIX):
      print(f"removing {path}, left by a prepare that did not finish", file=sys.stderr)
      shutil.rmtree(path, ignore_errors=True)


def _replace(new: str, final: str) -> None:
  """Puts the folder `new` at `final`, the old copy moved aside first, then deleted."""
  old = f"{final}{_OLD_SUFFIX}{os.getpid()}"
  os.rename(final, old)
  try:
    os.rename(new, final)
  except OSError:
    os.rename(old, final)
    raise
  shutil.rmtree(old, ignore_errors=True)


def _out_of_space(error: BaseException) -> bool:
  while error is not None:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "No space left" in str(error) or "Disk quota exceeded" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


def _build(builder_cls, name: str, manual_dir: str, data_dir: str, workers: int | None,
           progress: bool, shown_dir: str | None = None):
  """Builds `name` from `manual_dir` into `data_dir` (nothing prepared there yet); errors
  name `shown_dir` (default `data_dir`)."""
  shown_dir = shown_dir or data_dir
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = builder_cls(data_dir=data_dir, file_format="array_record")
  if workers:
    builder.workers = workers
  bars = {}
  if progress:
    from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top

    def show(split: str, done: int, total: int) -> None:
      if split not in bars:
        for bar in bars.values():
          bar.close()
        bars[split] = tqdm.tqdm(total=total, desc=f"{builder.name} {split}", unit="img",
                                file=sys.stderr)
      bars[split].update(1)
    builder.progress = show
  tfds.disable_progress_bar()
  config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
  try:
    builder.download_and_prepare(download_config=config)
    with open(os.path.join(builder.data_dir, REPORT_FILE), "w") as f:
      f.write(summary(builder, full=True) + "\n")
  except AssertionError as e:
    if "No examples were yielded" in str(e):
      raise PrepareError(f"{name}: no image of a split could be read ({e}); check the files "
                         f"under {manual_dir}") from e
    raise
  except Exception as e:  # pylint: disable=broad-except; TFDS and TF wrap OSErrors
    if _out_of_space(e):
      raise PrepareError(f"no room left in {shown_dir} while writing {name}, nothing prepared "
                         "was replaced; free space there, or give another --data_dir") from None
    if isinstance(e, OSError):
      raise PrepareError(f"cannot write {name} in {shown_dir} ({e.strerror or e}); give a "
                         "--data_dir you can write") from None
    raise
  finally:
    for bar in bars.values():
      bar.close()
  return builder


def _prepare(_: list[str]) -> None:
  if not FLAGS.dataset:
    raise PrepareError("--dataset is required (cub, cars, sop, inshop, hotels50k, folder)")
  logging.set_verbosity(logging.ERROR)  # TFDS's info lines would drown the progress bar
  from hn_jax.data.tfds_builders import LayoutError  # pylint: disable=g-import-not-at-top
  data_dir = FLAGS.data_dir or os.environ.get("HN_DATA_DIR", "")
  try:
    name = canonical_name(FLAGS.dataset)
    builder = prepare(name, FLAGS.manual_dir, data_dir, overwrite=FLAGS.overwrite,
                      workers=FLAGS.workers)
  except LayoutError as e:
    raise PrepareError(str(e)) from e
  if not builder.progress:  # nothing was built
    print(f"{name} is already prepared (--overwrite rebuilds it).")
  print(summary(builder))


def main(argv: Sequence[str] | None = None) -> int:
  """The command line (without the program name); returns the exit status."""
  return cli.run(_prepare, FLAGS, argv, prog=PROG, doc=__doc__, errors=(PrepareError,))


if __name__ == "__main__":
  sys.exit(main())
