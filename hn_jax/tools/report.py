"""Tables and figures from TensorBoard logs of hn_jax runs and of the original release.

Usage::

    python -m hn_jax.tools.report DIR... [--json] [--plot FILE.png] [--verbose]

Layout. Every directory that directly holds ``events.out.tfevents.*`` files is one *run*
(one seed), except that a directory named like a writer's sub-folder (``train``, ``eval``,
... see ``WRITER_SUBDIRS``) counts as part of its parent. A run's *group* is the directory
that holds the run folders, i.e. the release's ``<DATA>_R50/<group>/<seed>/events*`` layout;
the group is shown by its basename (e.g. ``sct_B128_R1_D64_lr0.009_lam1.0``), with parent
folders prefixed only where two groups would otherwise share a name. DIR may be a root of
many groups, one group, or a single seed folder.

Reading. Event files are read with tensorboard's pure-Python record reader (both CRCs of
every record checked; a truncated tail, as left by a run still writing, is ignored) and
parsed with tensorboard's protos: no TensorFlow import, no reservoir sampling. Not through
``EventFileLoader``: where TensorFlow is installed (a dependency here) it imports it to read,
which costs seconds for a few megabytes of logs. `benchmarks/event_reader.py` on the
release's logs (1.8 MB, 10 files; 2 cores, 2026-11-29): tensorboard's reader 0.69 s,
``RawEventFileLoader`` 5.71 s (TensorFlow imported), this module's whole load 1.45 s.
Scalars may be TF1-style ``simple_value`` (the release, PyTorch's SummaryWriter) or TF2-style
single-element tensors (``tf.summary.scalar``, CLU). When several values of a tag share a
step -- within one file (the release writes some recall keys twice) or across the files of a
resumed run -- the one with the latest wall time wins, ties going to the later file and then
to the later record: "the last value written".

Table. For each group and each ``*_test_R_<K>`` key (sorted by dataset prefix, then K
numerically), the mean and the sample standard deviation (ddof=1) over runs of the key's
value at its last step, and n, the number of runs averaged. The table shows recall in percent
with two decimals (as the paper's and the README's tables); ``--json`` keeps the logged
fractions. A cell of a single run shows ``(n=1)`` instead of a spread (its JSON row keeps
std 0.0).

Collapse rule, applied per run (thresholds are the module constants below):
  * if the run logged ``embedding_mean_sim`` (hn_jax's trainer: mean pairwise cosine
    similarity of a training batch's embeddings), it collapsed when the last value is
    > ``COLLAPSE_SIM_THRESHOLD`` (0.9) or non-finite;
  * otherwise (the release's logs) it collapsed when its final ``*_test_R_1`` is
    < ``COLLAPSE_RECALL_THRESHOLD`` (0.05), the chance level being unknown from the logs;
  * in both cases, a non-finite final ``loss`` also marks the run collapsed.
A group whose runs all collapsed shows "collapse" in every cell (as the paper's table does;
its JSON rows carry the mean over all of its runs, with ``"collapse": true``). A group with
some collapsed runs is averaged over the others, and the table says how many collapsed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
from absl import flags
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import types_pb2
from tensorboard.compat.tensorflow_stub import errors as tb_errors
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow

from hn_jax import cli

EVENT_FILE_PREFIX = "events.out.tfevents."
# Folder names a writer may put below a run folder; such a folder belongs to its parent run.
WRITER_SUBDIRS = frozenset(
    {"train", "eval", "test", "valid", "validation", "tb", "tensorboard", "logs", "summaries"}
)

HN_RATIO_KEY = "hn_ratio"
LOSS_KEY = "loss"
COLLAPSE_SIM_KEY = "embedding_mean_sim"
# A run with `embedding_mean_sim` collapsed when its last value exceeds this.
COLLAPSE_SIM_THRESHOLD = 0.9
# A run without `embedding_mean_sim` collapsed when its final test R@1 is below this.
COLLAPSE_RECALL_THRESHOLD = 0.05

TEST_RECALL_RE = re.compile(r"^(?P<data>.+)_test_R_(?P<k>\d+)$")

PathLike = Union[str, os.PathLike]
Point = tuple[int, float, float]  # (step, wall_time, value)
Scalars = dict[str, list[Point]]


class ReportError(Exception):
  """A user-facing problem (missing directory, no event files, unreadable file)."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One run (seed): its folder and its merged scalar series."""

  name: str
  path: Path
  scalars: Scalars


# ----------------------------------------------------------------------------- reading

def iter_records(path: PathLike) -> Iterator[bytes]:
  """Yields the payloads of a TFRecord file; stops quietly at a truncated last record.

  tensorboard's own reader (the one its EventFileLoader uses without TensorFlow): both
  CRCs of every record are checked. Raises ReportError for a corrupt, not merely
  truncated, file.
  """
  reader = pywrap_tensorflow.PyRecordReader_New(os.fspath(path))
  try:
    while True:
      try:
        reader.GetNext()
      except tb_errors.OutOfRangeError:
        return
      except tb_errors.DataLossError as e:
        if "truncated record" in str(e):
          return  # truncated tail: the writer had not finished this record
        raise ReportError(f"corrupt event file ({e.message})") from e
      yield reader.record()
  finally:
    reader.file_handle.close()


_TENSOR_DTYPES: dict[int, tuple[str, str]] = {
    # DataType -> (numpy dtype of tensor_content, repeated field holding the values)
    types_pb2.DT_FLOAT: ("<f4", "float_val"),
    types_pb2.DT_DOUBLE: ("<f8", "double_val"),
    types_pb2.DT_HALF: ("<f2", "half_val"),
    types_pb2.DT_BFLOAT16: ("<u2", "half_val"),
    types_pb2.DT_INT8: ("<i1", "int_val"),
    types_pb2.DT_UINT8: ("<u1", "int_val"),
    types_pb2.DT_INT16: ("<i2", "int_val"),
    types_pb2.DT_UINT16: ("<u2", "int_val"),
    types_pb2.DT_INT32: ("<i4", "int_val"),
    types_pb2.DT_INT64: ("<i8", "int64_val"),
}


def _tensor_scalar(tensor: Any) -> float | None:
  """The value of a single-element numeric TensorProto, else None."""
  spec = _TENSOR_DTYPES.get(tensor.dtype)
  if spec is None or any(d.size != 1 for d in tensor.tensor_shape.dim):
    return None
  np_dtype, field = spec
  if tensor.tensor_content:
    array = np.frombuffer(tensor.tensor_content, dtype=np_dtype)
    if array.size != 1:
      return None
    raw = array[0]
  else:
    values = getattr(tensor, field)
    if len(values) > 1:
      return None
    raw = values[0] if values else 0  # an empty proto means zeros
    if tensor.dtype == types_pb2.DT_HALF:
      raw = np.array([raw], dtype="<u2").view("<f2")[0]
  if tensor.dtype == types_pb2.DT_BFLOAT16:
    raw = np.array([int(raw) << 16], dtype="<u4").view("<f4")[0]
  return float(raw)


def scalar_of(value: Any) -> float | None:
  """The scalar carried by a ``Summary.Value`` (simple_value or tensor), else None."""
  kind = value.WhichOneof("value")
  if kind == "simple_value":
    return float(value.simple_value)
  if kind == "tensor" and value.metadata.plugin_data.plugin_name in ("", "scalars"):
    return _tensor_scalar(value.tensor)
  return None


def read_event_file(path: PathLike) -> Iterator[tuple[str, int, float, float]]:
  """Yields (tag, step, wall_time, value) for each scalar in one event file, in order."""
  parse = event_pb2.Event.FromString
  try:
    for record in iter_records(path):
      event = parse(record)
      if not event.HasField("summary"):
        continue
      for value in event.summary.value:
        x = scalar_of(value)
        if x is not None:
          yield value.tag, int(event.step), float(event.wall_time), x
  except OSError as e:
    raise ReportError(f"cannot read {path}: {e}") from e
  except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
    if isinstance(e, ReportError):
      raise
    raise ReportError(f"cannot parse event file {path}: {e}") from e


def _is_event_file(path: Path) -> bool:
  return path.name.startswith(EVENT_FILE_PREFIX) and path.is_file()


def _event_file_order(path: Path) -> tuple[int, str]:
  """Creation order of event files: the timestamp in the name, then the name."""
  stamp = path.name[len(EVENT_FILE_PREFIX):].split(".", 1)[0]
  return (int(stamp) if stamp.isdigit() else 0, path.name)


def event_files(path: PathLike) -> list[Path]:
  """The event files at or below ``path`` (a file or a directory), in creation order."""
  p = Path(path)
  found = [p] if _is_event_file(p) else [f for f in p.rglob(EVENT_FILE_PREFIX + "*")
                                         if f.is_file()]
  return sorted(found, key=_event_file_order)


def load_scalars(path: PathLike | Sequence[PathLike]) -> Scalars:
  """Scalars of one run: tag -> [(step, wall_time, value)], one point per step, by step.

  ``path`` is an event file, a directory (every event file below it is merged) or a list
  of either. At a step written more than once the latest wall time wins; ties go to the
  later file, then to the later record.
  """
  paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
  files: list[Path] = []
  for p in paths:
    files.extend(event_files(p))
  files = sorted(set(files), key=_event_file_order)
  best: dict[str, dict[int, tuple[tuple[float, int, int], float]]] = {}
  for rank, f in enumerate(files):
    for index, (tag, step, wall, value) in enumerate(read_event_file(f)):
      key = (wall, rank, index)
      per_step = best.setdefault(tag, {})
      old = per_step.get(step)
      if old is None or key >= old[0]:
        per_step[step] = (key, value)
  return {
      tag: [(step, key[0], value) for step, (key, value) in sorted(per_step.items())]
      for tag, per_step in sorted(best.items())
  }


def last_value(series: Sequence[Point] | None) -> float | None:
  """The value at the last step of a series (None for a missing or empty series)."""
  return series[-1][2] if series else None


# ----------------------------------------------------------------------------- grouping

def _run_dir(events_dir: Path) -> Path:
  while events_dir.name in WRITER_SUBDIRS and events_dir.parent != events_dir:
    events_dir = events_dir.parent
  return events_dir


def find_runs(directory: PathLike) -> dict[Path, list[Path]]:
  """Run folder -> its event files, for every run at or below ``directory``.

  Raises ReportError when the directory does not exist or holds no event files.
  """
  root = Path(directory)
  if not root.exists():
    raise ReportError(f"no such directory: {directory}")
  if not root.is_dir():
    raise ReportError(f"not a directory: {directory}")
  runs: dict[Path, list[Path]] = {}
  for f in event_files(root):
    runs.setdefault(_run_dir(f.parent.resolve()), []).append(f)
  if not runs:
    raise ReportError(f"no {EVENT_FILE_PREFIX}* files below {directory}")
  return runs


def _unique_names(dirs: Sequence[Path]) -> dict[Path, str]:
  """Short display names: the basename, with parents prefixed until names are unique."""
  depth = {d: 1 for d in dirs}

  def name(d: Path) -> str:
    parts = d.parts[-depth[d]:]
    return "/".join(parts)

  while True:
    by_name: dict[str, list[Path]] = {}
    for d in dirs:
      by_name.setdefault(name(d), []).append(d)
    clashes = [ds for ds in by_name.values() if len(ds) > 1]
    grown = False
    for ds in clashes:
      for d in ds:
        if depth[d] < len(d.parts):
          depth[d] += 1
          grown = True
    if not clashes or not grown:
      return {d: name(d) for d in dirs}


def group_runs(dirs: Sequence[PathLike]) -> dict[str, dict[Path, list[Path]]]:
  """Group name -> {run folder -> event files}, for the runs below all of ``dirs``."""
  by_group: dict[Path, dict[Path, list[Path]]] = {}
  for d in dirs:
    for run, files in find_runs(d).items():
      merged = by_group.setdefault(run.parent, {}).setdefault(run, [])
      merged.extend(f for f in files if f not in merged)
  names = _unique_names(sorted(by_group))
  return {
      names[g]: dict(sorted(by_group[g].items(), key=lambda kv: _natural_key(kv[0].name)))
      for g in sorted(by_group, key=lambda g: names[g])
  }


def _natural_key(name: str) -> tuple[Any, ...]:
  return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def load_groups(
    dirs: Sequence[PathLike], timings: dict[str, float] | None = None
) -> dict[str, list[Run]]:
  """Group name -> its runs with their scalars; per-run read seconds go to ``timings``."""
  groups: dict[str, list[Run]] = {}
  for group, runs in group_runs(dirs).items():
    for run_dir, files in runs.items():
      t0 = time.perf_counter()
      scalars = load_scalars(files)
      if timings is not None:
        timings[str(run_dir)] = time.perf_counter() - t0
      groups.setdefault(group, []).append(Run(run_dir.name, run_dir, scalars))
  return groups


# ----------------------------------------------------------------------------- statistics

def recall_metrics(keys: Sequence[str] | set[str]) -> list[str]:
  """The ``*_test_R_<K>`` keys among ``keys``, sorted by prefix, then K numerically."""
  found = [(m.group("data"), int(m.group("k")), k)
           for k in keys if (m := TEST_RECALL_RE.match(k))]
  return [k for _, _, k in sorted(found)]


def _final_test_r1(scalars: Mapping[str, Sequence[Point]]) -> float | None:
  keys = [k for k in recall_metrics(set(scalars)) if k.endswith("_test_R_1")]
  return last_value(scalars[keys[0]]) if keys else None


def is_collapsed(scalars: Mapping[str, Sequence[Point]]) -> bool:
  """Whether one run collapsed, by the rule in the module docstring."""
  loss = last_value(scalars.get(LOSS_KEY))
  if loss is not None and not math.isfinite(loss):
    return True
  sim = last_value(scalars.get(COLLAPSE_SIM_KEY))
  if sim is not None:
    return not math.isfinite(sim) or sim > COLLAPSE_SIM_THRESHOLD
  r1 = _final_test_r1(scalars)
  return r1 is not None and (not math.isfinite(r1) or r1 < COLLAPSE_RECALL_THRESHOLD)


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
  if not values:
    return None, None
  x = np.asarray(values, dtype=np.float64)
  std = float(np.std(x, ddof=1)) if x.size > 1 else 0.0
  return float(np.mean(x)), std


def finite_mean_std(values: Sequence[float | None]) -> dict[str, float | None]:
  """{"mean", "std"} of the finite values (sample std, 0 for one value; None for none)."""
  mean, std = _mean_std([v for v in values if v is not None and math.isfinite(v)])
  return {"mean": mean, "std": std}


def summarize(groups: Mapping[str, Sequence[Run]]) -> list[dict[str, Any]]:
  """One row per group x ``*_test_R_<K>`` key, over the group's runs.

  Each row: group, metric, mean, std (ddof=1; 0.0 for n=1), n (runs averaged), collapse
  (all runs collapsed: then mean/std/n are over all runs), n_collapsed, n_runs,
  collapsed_runs (their folder names) and last_steps (the distinct last steps averaged;
  more than one means the runs did not all reach the same evaluation).
  """
  rows = []
  for group, runs in groups.items():
    collapsed = [r for r in runs if is_collapsed(r.scalars)]
    all_collapsed = bool(runs) and len(collapsed) == len(runs)
    collapsed_ids = {id(r) for r in collapsed}
    counted = runs if all_collapsed else [r for r in runs if id(r) not in collapsed_ids]
    keys = recall_metrics({k for r in runs for k in r.scalars})
    for metric in keys:
      finals = [r.scalars[metric][-1] for r in counted if r.scalars.get(metric)]
      mean, std = _mean_std([p[2] for p in finals])
      rows.append({
          "group": group,
          "metric": metric,
          "mean": mean,
          "std": std,
          "n": len(finals),
          "collapse": all_collapsed,
          "n_collapsed": len(collapsed),
          "n_runs": len(runs),
          "collapsed_runs": [r.name for r in collapsed],
          "last_steps": sorted({p[0] for p in finals}),
      })
  return rows


def format_table(rows: Sequence[Mapping[str, Any]], digits: int = 2) -> str:
  """A plain-text table: one line per group, a ``mean +- std`` column per metric in percent
  (as the paper's and the README's tables), n. The rows (and ``--json``) keep fractions."""
  groups: dict[str, list[Mapping[str, Any]]] = {}
  for row in rows:
    groups.setdefault(row["group"], []).append(row)
  metrics = recall_metrics({row["metric"] for row in rows})
  header = ["group", *metrics, "n", "collapsed"]
  lines = [header]
  for group, grows in groups.items():
    by_metric = {row["metric"]: row for row in grows}
    n = max(row["n"] for row in grows)
    first = grows[0]
    cells = [group]
    for metric in metrics:
      row = by_metric.get(metric)
      if row is None or row["mean"] is None:
        cells.append("-")
      elif row["collapse"]:
        cells.append("collapse")
      else:
        mean, std = 100 * row["mean"], 100 * row["std"]
        if row["n"] == 1:
          cell = f"{mean:.{digits}f} (n=1)"
        else:
          cell = f"{mean:.{digits}f} +- {std:.{digits}f}"
          if row["n"] != n:
            cell += f" (n={row['n']})"
        cells.append(cell)
    cells += [str(n), f"{first['n_collapsed']}/{first['n_runs']}"]
    lines.append(cells)
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  text = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(line, widths))).rstrip()
          for line in lines]
  text.append("recall in percent: the mean over runs of each run's final value, and the "
              "sample standard deviation")
  if any(row["n_collapsed"] for row in rows):
    text.append("collapsed runs are left out of the mean unless all of a group collapsed "
                "(see `python -m hn_jax.tools.report --help`)")
  return "\n".join(text)


# ----------------------------------------------------------------------------- figure

def _mean_curve(series: Sequence[Sequence[Point]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Steps, mean and std over runs at each step (each step over the runs that have it)."""
  acc: dict[int, list[float]] = {}
  for s in series:
    for step, _, value in s:
      acc.setdefault(step, []).append(value)
  steps = np.array(sorted(acc), dtype=np.int64)
  mean = np.array([np.mean(acc[s]) for s in steps.tolist()])
  std = np.array([np.std(acc[s]) for s in steps.tolist()])
  return steps, mean, std


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
  """Centered moving average that keeps the length (shorter windows at the edges)."""
  if window <= 1 or y.size < 3:
    return y
  kernel = np.ones(window)
  finite = np.isfinite(y)
  total = np.convolve(np.where(finite, y, 0.0), kernel, mode="same")
  count = np.convolve(finite.astype(float), kernel, mode="same")
  with np.errstate(invalid="ignore", divide="ignore"):
    return total / count


def _group_label(group: str, runs: Sequence[Run], labels: Mapping[str, str] | None) -> str:
  n_col = sum(is_collapsed(r.scalars) for r in runs)
  label = (labels or {}).get(group, group) + f" (n={len(runs)}"
  if n_col == len(runs):
    return label + ", collapse)"
  return label + (f", {n_col} collapsed)" if n_col else ")")


def _test_r1_key(runs: Sequence[Run]) -> str | None:
  keys = [k for k in recall_metrics({k for r in runs for k in r.scalars})
          if k.endswith("_test_R_1")]
  return keys[0] if keys else None


def _draw(ax: Any, groups: Mapping[str, Sequence[Run]], key_of: Any, smooth: bool,
          labels: Mapping[str, str] | None) -> tuple[list[Any], list[str]]:
  """One thin line per run (dashed, ending in an x, where the run collapsed) and the
  group's mean over its runs; returns legend handles and labels."""
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top
  handles, names = [], []
  for i, (group, runs) in enumerate(groups.items()):
    color = f"C{i % 10}"
    series = []
    for run in runs:
      key = key_of(runs)
      s = run.scalars.get(key) if key else None
      if not s:
        continue
      series.append(s)
      steps = np.array([p[0] for p in s])
      values = np.array([p[2] for p in s])
      if smooth:
        values = _smooth(values, max(1, steps.size // 50))
      dead = is_collapsed(run.scalars)
      ax.plot(steps, values, color=color, lw=0.8, alpha=0.45, ls="--" if dead else "-",
              marker=None if smooth else ".", ms=3)
      if dead:
        ax.plot(steps[-1:], values[-1:], color=color, marker="x", ms=8, mew=2)
    if not series:
      continue
    steps, mean, _ = _mean_curve(series)
    if smooth:
      mean = _smooth(mean, max(1, steps.size // 50))
    all_dead = all(is_collapsed(r.scalars) for r in runs)
    ax.plot(steps, mean, color=color, lw=2.2, ls="--" if all_dead else "-")
    handles.append(Line2D([], [], color=color, lw=2.2, ls="--" if all_dead else "-",
                          marker="x" if all_dead else None, ms=8, mew=2))
    names.append(_group_label(group, runs, labels))
  return handles, names


def _new_figure(size: tuple[float, float], ncols: int = 1) -> tuple[Any, Any]:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt.subplots(1, ncols, figsize=size)


def _finish(fig: Any, handles: list[Any], names: list[str], out_path: PathLike) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig.legend(handles, names, loc="lower center", ncol=min(3, max(1, len(names))),
             fontsize="small", frameon=False)
  rows = (len(names) + 2) // 3
  fig.tight_layout(rect=(0, min(0.45, 0.06 * rows + 0.03), 1, 1))
  fig.savefig(out_path, dpi=100)
  plt.close(fig)


_COLLAPSE_NOTE = "thin: each run; thick: mean over runs; dashed, x: collapsed"


def _hn_ratio_axes(ax: Any, groups: Mapping[str, Sequence[Run]],
                   labels: Mapping[str, str] | None, title: str) -> tuple[list[Any], list[str]]:
  out = _draw(ax, groups, lambda runs: HN_RATIO_KEY, True, labels)
  ax.set(title=title, xlabel="training step", ylabel="hn_ratio (smoothed)", ylim=(-0.02, 1.02))
  ax.grid(alpha=0.3)
  return out


def _recall_axes(ax: Any, groups: Mapping[str, Sequence[Run]], key: str | None,
                 labels: Mapping[str, str] | None, title: str) -> tuple[list[Any], list[str]]:
  out = _draw(ax, groups, (lambda runs: key) if key else _test_r1_key, False, labels)
  ax.set(title=title, xlabel="epoch", ylabel=key or "test R@1")
  ax.xaxis.get_major_locator().set_params(integer=True)
  ax.grid(alpha=0.3)
  return out


def plot_hn_ratio(groups: Mapping[str, Sequence[Run]], out_path: PathLike, *,
                  labels: Mapping[str, str] | None = None,
                  title: str = "share of hard triplets (hn_ratio)") -> None:
  """Writes a PNG of hn_ratio over training steps, every run and each group's mean."""
  fig, ax = _new_figure((8, 5.5))
  handles, names = _hn_ratio_axes(ax, groups, labels, f"{title}\n{_COLLAPSE_NOTE}")
  _finish(fig, handles, names, out_path)


def plot_test_recall(groups: Mapping[str, Sequence[Run]], out_path: PathLike, *,
                     key: str | None = None, labels: Mapping[str, str] | None = None,
                     title: str = "test R@1") -> None:
  """Writes a PNG of the test R@1 (or `key`) over epochs, every run and each group's mean."""
  fig, ax = _new_figure((8, 5.5))
  handles, names = _recall_axes(ax, groups, key, labels, f"{title}\n{_COLLAPSE_NOTE}")
  _finish(fig, handles, names, out_path)


def plot(groups: Mapping[str, Sequence[Run]], out_path: PathLike) -> None:
  """Writes a PNG: hn_ratio over steps and test R@1 over epochs side by side."""
  fig, (ax_hn, ax_r1) = _new_figure((13, 5.5), ncols=2)
  handles, names = _hn_ratio_axes(ax_hn, groups, None, "share of hard triplets (hn_ratio)")
  more = _recall_axes(ax_r1, groups, None, None, "test R@1")
  for handle, name in zip(*more):
    if name not in names:
      handles.append(handle)
      names.append(name)
  fig.suptitle(_COLLAPSE_NOTE, fontsize="small")
  _finish(fig, handles, names, out_path)


# ----------------------------------------------------------------------------- CLI

def json_safe(value: Any) -> Any:
  """`value` with non-finite floats as None (JSON has no NaN)."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


PROG = "hn_jax.tools.report"
FLAGS = cli.command_flags()
flags.DEFINE_bool("json", False, "Print JSON rows, not a table.", flag_values=FLAGS)
flags.DEFINE_string("plot", None, "Also write a figure here (FILE.png).", flag_values=FLAGS)
flags.DEFINE_bool("timings", False, "Print each run's read time to stderr.", flag_values=FLAGS)


def _report(dirs: list[str]) -> int:
  if not dirs:
    raise ReportError("give at least one DIR with event files: python -m hn_jax.tools.report "
                      "DIR... [--json] [--plot=FILE.png]")
  timings: dict[str, float] = {}
  groups = load_groups(dirs, timings)
  if FLAGS.timings:
    for run, seconds in timings.items():
      print(f"read {run} in {seconds:.3f} s", file=sys.stderr)
  rows = summarize(groups)
  for group, runs in groups.items():
    if not recall_metrics({k for r in runs for k in r.scalars}):
      print(f"{PROG}: warning: no *_test_R_* scalars in group {group}", file=sys.stderr)
  for row in rows:
    if len(row["last_steps"]) > 1:
      print(f"{PROG}: warning: {row['group']} {row['metric']}: runs end at "
            f"different steps {row['last_steps']}", file=sys.stderr)
  if FLAGS.json:
    safe = [{k: json_safe(v) for k, v in row.items()} for row in rows]
    print(json.dumps(safe, indent=1, allow_nan=False))
  else:
    print(format_table(rows))
  if FLAGS.plot:
    plot(groups, FLAGS.plot)
    print(f"{PROG}: wrote {FLAGS.plot}", file=sys.stderr)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """The command line (without the program name): DIR... [flags]; returns the exit status."""
  return cli.run(_report, FLAGS, argv, prog=PROG, doc=__doc__, positional=10**6,
                 errors=(ReportError,))


if __name__ == "__main__":
  sys.exit(main())
