"""The paper's table on an in-memory dataset: a learning-rate search, the seeds, the table.

Usage::

    python -m hn_jax.tools.reproduce --root=/tmp/hn_table [--config=configs/synthetic.py]
        [--methods=hn,shn,sct] [--lrs=0.3,1,3] [--seeds=0,1,2,3,4] [--search_seeds=0,1]
        [--figures=/tmp/hn_table/synthetic] [--json=FILE.json] [--config.KEY=VALUE ...]
    python -m hn_jax.tools.reproduce --protocol=mlrc --root=/tmp/hn_study [--methods=...]
        [--trials=10] [--folds=4] [--fold_seed=0] [--trial_seed=0] [--parallel=1] [--json=FILE]
    python -m hn_jax.tools.reproduce --protocol=both --root=/tmp/hn_both ...  (the two, and a
        table of them side by side)

``--protocol=mlrc`` is `hn_jax.tools.study`: each loss tuned with the same budget on
validation classes, the test split read once (docs/study.md). What follows is the default,
``--protocol=paper``: the paper's study, kept as it was so that its table can be compared.

1. Search: every method at every learning rate of ``--lrs``, with the ``--search_seeds``.
2. Choice, per method (the paper kept the best learning rate of each method): the rate with
   the highest mean final test R@1 over the search seeds among the rates where no search
   run collapsed; where every rate had a collapse, the highest mean all the same (the table
   then says ``collapse`` if every seed collapses). Ties go to the smaller rate. Like the
   paper, this chooses on the test split (there is no validation split).
3. Seeds: the chosen rate of each method with every seed of ``--seeds`` (the search runs of
   those seeds are reused: same config, same seed, the same run).
4. The table (mean +- sample std over seeds of the final test R@1/2/4/8, in percent, or
   ``collapse`` where every seed collapsed; `hn_jax.tools.report`'s rule) and, with
   ``--figures=PREFIX``, ``PREFIX_hn_ratio.png`` and ``PREFIX_recall.png``.

Every run is an ordinary hn_jax run in the release's layout,
``ROOT/<DATA>_R50/<method>_B<batch>_R<repeat>_D<dim>_lr<lr>_lam<lam>/<seed>/``, run in this
process one after another (``--parallel=N``: N at once, in subprocesses); `python -m
hn_jax.tools.report ROOT/<DATA>_R50` reads them too. A run whose loss stays non-finite is
given up, not the study: its workdir gets ``stopped.json``, it counts as collapsed with no
recall, and the same command again does not retry it (delete the file to). Running
the command again on the same root skips finished runs and resumes interrupted ones (or
lengthens them, for a larger ``--config.num_epochs``); a root holding runs of another config
is refused (`hn_jax.run_config`'s rule). Compiled programs are cached (`hn_jax.compile_cache`:
the command's ``--xla_cache``, ``~/.cache/hn_jax/xla`` by default; ``ROOT/xla_cache`` when
`reproduce` is called from Python with no cache set), so the seeds of a method compile once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags

from hn_jax import cli, compile_cache
from hn_jax.tools import report

PAPER_KS = (1, 2, 4, 8)


class ReproduceError(Exception):
  """A user-facing problem with the arguments or the root; the message says the fix."""


@dataclasses.dataclass(frozen=True)
class SearchResult:
  """One searched rate of a method: mean final test R@1 over the search seeds, whether
  any of them collapsed, and each seed's final test R@1."""

  method: str
  lr: str
  r1: float
  collapsed: bool
  r1_per_seed: tuple[float, ...] = ()


def group_name(config: ml_collections.ConfigDict, method: str, lr: str) -> str:
  """The release's run-group folder name, as launch/sweep.sh writes it."""
  return (f"{method}_B{config.batch_size}_R{config.repeat}_D{config.embedding_dim}"
          f"_lr{lr}_lam{config.lam}")


def config_for(config: ml_collections.ConfigDict, method: str, lr: str,
               seed: int) -> ml_collections.ConfigDict:
  """`config` for one run of the study."""
  run = ml_collections.ConfigDict(config.to_dict())
  run.loss = method
  run.learning_rate = float(lr)
  run.seed = seed
  return run


STOPPED_FILE = "stopped.json"  # in a run's workdir: a study gave the run up (see `train_or_mark`)


def stopped(workdir: str | os.PathLike) -> str | None:
  """Why a study gave up a run (its loss stayed non-finite), or None if it did not."""
  try:
    return str(json.loads((Path(workdir) / STOPPED_FILE).read_text())["reason"])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def train_or_mark(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                  changes: dict | None = None) -> None:
  """Trains (or resumes) one run of a study. A run whose loss stays non-finite is a failed
  setting, not a failed study: its workdir gets `STOPPED_FILE` with the reason, the study
  scores it as failed and goes on, and the same command again does not retry it."""
  from hn_jax import errors, train  # pylint: disable=g-import-not-at-top  (JAX only when training)
  try:
    train.train_and_evaluate(config, str(workdir), changes=changes)
  except errors.TrainingStopped as e:
    path = Path(workdir) / STOPPED_FILE
    path.with_suffix(".tmp").write_text(json.dumps({"reason": str(e)}))
    path.with_suffix(".tmp").replace(path)


def is_done(config: ml_collections.ConfigDict, workdir: Path, key: str) -> bool:
  """Whether a study need not train this run: it finished, or the study gave it up."""
  if stopped(workdir) is not None:
    return True
  has_events = workdir.is_dir() and any(workdir.glob(report.EVENT_FILE_PREFIX + "*"))
  return _complete(report.load_scalars(workdir) if has_events else {}, config, key, workdir)


def _complete(scalars: Mapping[str, Any], config: ml_collections.ConfigDict, key: str,
              workdir: Path) -> bool:
  """Whether a run's scalars already hold its final test recall and its final checkpoint
  verifies (`hn_jax.checkpoints`: else training mends the run first)."""
  series = scalars.get(f"{key}_test_R_1", [])
  if not (series and series[-1][0] == config.num_epochs):
    return False
  from hn_jax import checkpoints, errors, sharding  # pylint: disable=g-import-not-at-top
  try:
    _, _, state, _ = checkpoints.restore_run(str(workdir))
  except (checkpoints.NoCheckpoint, errors.NoGoodCheckpoint):
    return False
  last_step = max(step for step, _, _ in scalars.get("step_loss", [(0, 0, 0)]))
  return int(sharding.local_value(state.step)) == last_step


def run_result(workdir: Path, key: str) -> dict[str, Any]:
  """A trained run's final test R@1, whether it collapsed, and why it stopped (None, or the
  reason a study gave it up: then it counts as collapsed, with no R@1)."""
  reason = stopped(workdir)
  scalars = report.load_scalars(workdir) if reason is None else {}
  return {"r1": report.last_value(scalars.get(f"{key}_test_R_1")),
          "collapsed": reason is not None or report.is_collapsed(scalars),
          "mean_sim": report.last_value(scalars.get(report.COLLAPSE_SIM_KEY)),
          "stopped": reason}


def train_run(config: ml_collections.ConfigDict, workdir: Path, key: str,
              log: Any = print, changes: dict | None = None) -> dict[str, Any]:
  """Trains one run (or resumes, or skips it when finished or given up); its final figures."""
  workdir.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  reused = is_done(config, workdir, key)
  if not reused:
    train_or_mark(config, workdir, changes)
  result = {**run_result(workdir, key), "seconds": time.perf_counter() - t0, "reused": reused}
  took = "already done" if reused else f"{result['seconds']:.0f} s"
  log(f"  {config.loss} lr {config.learning_rate:g} seed {config.seed}: " + (
      "stopped, its loss not finite" if result["stopped"] else
      f"test R@1 {_num(result['r1'])}, embedding_mean_sim {_num(result['mean_sim'])}"
      f"{' (collapse)' if result['collapsed'] else ''}") + f", {took}")
  return result


def _num(x: float | None) -> str:
  return "-" if x is None else f"{x:.3f}"


def choose(results: Sequence[SearchResult]) -> SearchResult:
  """The searched rate kept for a method: best mean R@1 of the uncollapsed, else of all."""
  pool = [r for r in results if not r.collapsed] or list(results)
  return max(pool, key=lambda r: (r.r1 if math.isfinite(r.r1) else -1.0, -float(r.lr)))


def _cell(row: dict[str, Any]) -> str:
  if row["mean"] is None:
    return "-"
  if row["collapse"]:
    return "collapse"
  cell = f"{100 * row['mean']:.2f} +- {100 * row['std']:.2f}"
  return cell + (f" ({row['n_collapsed']} collapsed)" if row["n_collapsed"] else "")


def paper_table(rows: Sequence[dict[str, Any]], chosen: dict[str, str], key: str) -> str:
  """The paper's table (markdown): a row per method, final test R@K in percent (the Ks of
  the dataset's logged `<key>_test_R_<K>`)."""
  by = {(r["group"], r["metric"]): r for r in rows}
  prefix = f"{key}_test_R_"
  ks = [m[len(prefix):] for m in report.recall_metrics({r["metric"] for r in rows})
        if m.startswith(prefix)] or [str(k) for k in PAPER_KS]
  lines = ["| method | lr | " + " | ".join(f"R@{k}" for k in ks) + " | seeds | collapsed |",
           "|---|---|" + "---|" * len(ks) + "---|---|"]
  for method, (group, lr) in chosen.items():
    cells = [_cell(by[(group, prefix + k)]) if (group, prefix + k) in by else "-" for k in ks]
    first = by.get((group, f"{key}_test_R_1"), {"n_runs": 0, "n_collapsed": 0})
    lines.append(f"| {method} | {lr} | " + " | ".join(cells)
                 + f" | {first['n_runs']} | {first['n_collapsed']}/{first['n_runs']} |")
  return "\n".join(lines)


def search_table(results: Sequence[SearchResult], chosen: dict[str, str],
                 seeds: Sequence[int]) -> str:
  """Mean final test R@1 over the search seeds, method x learning rate (markdown)."""
  lrs = list(dict.fromkeys(r.lr for r in results))
  name = f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
  lines = [f"| method ({name}) | " + " | ".join(f"lr {lr}" for lr in lrs) + " |",
           "|---|" + "---|" * len(lrs)]
  for method in dict.fromkeys(r.method for r in results):
    cells = []
    for lr in lrs:
      r = next((x for x in results if x.method == method and x.lr == lr), None)
      if r is None:
        cells.append("-")
        continue
      cell = f"{100 * r.r1:.1f}" + (" collapse" if r.collapsed else "")
      if len(r.r1_per_seed) > 1:
        cell += " (" + ", ".join(f"{100 * x:.1f}" for x in r.r1_per_seed) + ")"
      cells.append(f"**{cell}**" if chosen[method] == lr else cell)
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def reproduce(config: ml_collections.ConfigDict, root: str | os.PathLike, *,
              methods: Sequence[str] = ("hn", "shn", "sct"),
              lrs: Sequence[str] = ("0.3", "1", "3"),
              seeds: Sequence[int] = (0, 1, 2, 3, 4), search_seeds: Sequence[int] = (0, 1),
              figures: str | None = None, parallel: int = 1,
              log: Any = print) -> dict[str, Any]:
  """Search, seeds, table and figures (see the module docstring); returns it all as data.
  `parallel` > 1 trains that many runs at once in subprocesses (`study.train_all`)."""
  from hn_jax import losses, run_config  # pylint: disable=g-import-not-at-top
  from hn_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from hn_jax.tools import study  # pylint: disable=g-import-not-at-top
  run_config.import_loss_module(config)  # registers the config's own loss, if it names one
  unknown = [m for m in methods if m not in losses.NAMES]
  if unknown or not methods:
    raise ReproduceError(f"--methods: {','.join(unknown) or 'none given'}; use some of "
                         f"{','.join(losses.NAMES)}")
  for lr in lrs:
    try:
      ok = float(lr) > 0
    except ValueError:
      ok = False
    if not ok:
      raise ReproduceError(f"--lrs: {lr!r} is not a positive learning rate")
  if not lrs or not seeds or not search_seeds:
    raise ReproduceError("--lrs, --seeds and --search_seeds need at least one value each")
  if parallel < 1:
    raise ReproduceError(f"--parallel={parallel}: use at least 1 process")
  import jax  # pylint: disable=g-import-not-at-top
  for method in methods:  # every setting checked before anything compiles
    run_config.validate(config_for(config, method, lrs[0], seeds[0]),
                        num_devices=jax.device_count(), num_processes=jax.process_count())
  key = datasets.KEYS[config.dataset]
  base = Path(root) / f"{key}_R50"
  if not jax.config.jax_compilation_cache_dir:
    # The seeds of a method compile the same programs: compile them once (the command line
    # has set hn_jax's cache already; a library caller gets ROOT/xla_cache, checked private).
    compile_cache.enable(Path(root).resolve() / "xla_cache", warn=log)
  started = time.perf_counter()

  def workdir(method: str, lr: str, seed: int) -> Path:
    return base / group_name(config, method, lr) / str(seed)

  for method in methods:  # a root of another config is refused before anything runs
    for lr in lrs:
      for seed in {*search_seeds, *seeds}:
        run_config.check(config_for(config, method, lr, seed), str(workdir(method, lr, seed)))
  total = len(methods) * (len(lrs) * len(search_seeds)
                          + len([s for s in seeds if s not in search_seeds]))
  log(f"search: {', '.join(methods)} at learning rates {', '.join(lrs)}, seeds "
      f"{', '.join(map(str, search_seeds))} "
      f"({total} runs in all, {parallel} at a time)")

  def train(jobs: Sequence[tuple[str, str, int]]) -> list[dict[str, Any]]:
    study.train_all([(config_for(config, m, lr, seed), workdir(m, lr, seed))
                     for m, lr, seed in jobs], key, parallel=parallel, log=log)
    return [run_result(workdir(m, lr, seed), key) for m, lr, seed in jobs]

  jobs = [(m, lr, seed) for m in methods for lr in lrs for seed in search_seeds]
  done = dict(zip(jobs, train(jobs)))
  search = []
  for method in methods:
    for lr in lrs:
      runs = [done[method, lr, seed] for seed in search_seeds]
      r1s = tuple(math.nan if d["r1"] is None else d["r1"] for d in runs)
      search.append(SearchResult(method, lr, float(sum(r1s) / len(r1s)),
                                 any(d["collapsed"] for d in runs), r1s))
  chosen = {m: choose([r for r in search if r.method == m]).lr for m in methods}
  log("chosen: " + ", ".join(f"{m} lr {lr}" for m, lr in chosen.items()))
  train([(m, lr, seed) for m, lr in chosen.items() for seed in seeds])

  groups = report.load_groups([base / group_name(config, m, lr) for m, lr in chosen.items()])
  # Only the chosen seeds: a search seed outside --seeds is not averaged.
  keep = {str(s) for s in seeds}
  named = {m: (group_name(config, m, lr), lr) for m, lr in chosen.items()}
  groups = {g: [r for r in groups[g] if r.name in keep] for g, _ in named.values()}
  rows = report.summarize(groups)
  result = {
      "dataset": key, "root": str(root), "methods": list(methods), "lrs": list(lrs),
      "seeds": list(seeds), "search_seeds": list(search_seeds),
      "search": [{**dataclasses.asdict(r), "r1": report.json_safe(r.r1),
                  "r1_per_seed": [report.json_safe(x) for x in r.r1_per_seed]}
                 for r in search], "chosen": chosen,
      "rows": [{k: report.json_safe(v) for k, v in r.items()} for r in rows],
      "search_table": search_table(search, chosen, search_seeds),
      "table": paper_table(rows, named, key),
      "map_r": {m: report.finite_mean_std([report.last_value(r.scalars.get(f"{key}_test_MAP_R"))
                              for r in groups[g]]) for m, (g, _) in named.items()},
  }
  if figures:
    labels = {g: f"{m}, lr {lr}" for m, (g, lr) in named.items()}
    result["figures"] = [f"{figures}_hn_ratio.png", f"{figures}_recall.png"]
    Path(figures).parent.mkdir(parents=True, exist_ok=True)
    report.plot_hn_ratio(groups, result["figures"][0], labels=labels,
                         title=f"{key}: share of hard triplets over training")
    report.plot_test_recall(groups, result["figures"][1], key=f"{key}_test_R_1",
                            labels=labels, title=f"{key}: test R@1 over training")
  result["seconds"] = time.perf_counter() - started
  return result


PROG = "hn_jax.tools.reproduce"
# The study's default config: configs/synthetic.py of this source tree.
DEFAULT_CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "synthetic.py")
FLAGS = cli.command_flags()
flags.DEFINE_string("root", None, "Where the runs go (the release's layout).", flag_values=FLAGS)
cli.define_config(FLAGS, DEFAULT_CONFIG, "The config file of the study (default: "
                  "configs/synthetic.py); --config.KEY=VALUE overrides its settings.")
flags.DEFINE_list("methods", ["hn", "shn", "sct"], "The losses, comma-separated: any "
                  "registered loss (hn_jax.losses.NAMES; the paper's: hn, shn, sct).",
                  flag_values=FLAGS)
flags.DEFINE_list("lrs", ["0.3", "1", "3"], "Learning rates searched, comma-separated, as "
                  "typed in folder names.", flag_values=FLAGS)
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "The seeds of the table.",
                  flag_values=FLAGS)
flags.DEFINE_list("search_seeds", ["0", "1"], "The seeds of the search runs.",
                  flag_values=FLAGS)
flags.DEFINE_string("figures", None, "Write PREFIX_hn_ratio.png and PREFIX_recall.png.",
                    flag_values=FLAGS)
flags.DEFINE_string("json", None, "Also write everything as JSON to this file.",
                    flag_values=FLAGS)
flags.DEFINE_enum("protocol", "paper", ["paper", "mlrc", "both"], "paper: the paper's "
                  "(chooses the learning rate on the test split); mlrc: choose on validation "
                  "classes (hn_jax.tools.study, docs/study.md); both: the two, then a table "
                  "of them side by side.", flag_values=FLAGS)
flags.DEFINE_integer("trials", 10, "mlrc: settings tried per loss (the same for every loss).",
                     flag_values=FLAGS)
flags.DEFINE_integer("folds", 4, "mlrc: class-disjoint folds of the training classes.",
                     flag_values=FLAGS)
flags.DEFINE_integer("fold_seed", 0, "mlrc: deals the classes into folds.", flag_values=FLAGS)
flags.DEFINE_integer("trial_seed", 0, "mlrc: seeds the quasi-random search.", flag_values=FLAGS)
flags.DEFINE_integer("parallel", 1, "Runs trained at once, by either protocol (subprocesses; "
                     "one GPU each where the host has several).", flag_values=FLAGS)


def side_by_side(config: ml_collections.ConfigDict, paper: Mapping[str, Any],
                 mlrc: Mapping[str, Any]) -> str:
  """Markdown, in percent: per loss, the paper's protocol (the learning rate chosen on the
  test split; test R@1 and MAP@R, mean +- std over seeds) beside mlrc's (the settings chosen
  on validation classes; test R@1 and MAP@R of the fold models concatenated, and separate:
  mean +- std over folds)."""
  by = {(r["group"], r["metric"]): r for r in paper["rows"]}

  def pct(mean, std=None):
    if mean is None:
      return "-"
    return f"{100 * mean:.2f}" + ("" if std is None else f" +- {100 * std:.2f}")

  lines = ["| loss | paper: lr | paper: R@1 | paper: MAP@R | mlrc: chosen | mlrc: R@1 concat | "
           "mlrc: R@1 separate | mlrc: MAP@R concat | mlrc: MAP@R separate |",
           "|---|---|---|---|---|---|---|---|---|"]
  for loss, lr in paper["chosen"].items():
    row = by.get((group_name(config, loss, lr), f"{paper['dataset']}_test_R_1"), {})
    first = ("collapse" if row.get("collapse") else pct(row.get("mean"), row.get("std"))
             if row else "-")
    map_r = paper.get("map_r", {}).get(loss, {"mean": None, "std": None})
    test = mlrc["test"].get(loss)
    settings = ", ".join(f"{k} {v:g}" for k, v in mlrc["chosen"][loss]["settings"].items())
    cells = []
    for metric in ("R_1", "MAP_R"):
      separate = test["separate"][metric] if test else {"mean": None, "std": None}
      cells += [pct(test["concatenated"][metric]) if test else "-",
                pct(separate["mean"], separate["std"])]
    lines.append(f"| {loss} | {lr} | {first} | {pct(map_r['mean'], map_r['std'])} | "
                 f"{settings} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _both(config: ml_collections.ConfigDict, seeds: Sequence[int],
          search_seeds: Sequence[int]) -> int:
  from hn_jax.tools import study  # pylint: disable=g-import-not-at-top
  started = time.perf_counter()
  methods = [m.strip() for m in FLAGS.methods if m.strip()]
  log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
  paper = reproduce(config, FLAGS.root, methods=methods,
                    lrs=[x.strip() for x in FLAGS.lrs if x.strip()], seeds=seeds,
                    search_seeds=search_seeds, figures=FLAGS.figures, parallel=FLAGS.parallel,
                    log=log)
  mlrc = study.mlrc(config, FLAGS.root, methods=methods, trials=FLAGS.trials, folds=FLAGS.folds,
                    fold_seed=FLAGS.fold_seed, trial_seed=FLAGS.trial_seed,
                    parallel=FLAGS.parallel, log=log)
  seconds = time.perf_counter() - started
  table = side_by_side(config, paper, mlrc)
  print(f"{paper['dataset']}: the paper's protocol beside mlrc's, test figures in percent:"
        f"\n\n{table}\n\nThe paper's protocol in full:\n\n{paper['table']}\n\n"
        f"mlrc in full:\n\n{mlrc['table']}")
  print(f"\n{seconds / 60:.1f} minutes in all", file=sys.stderr)
  if FLAGS.json:
    Path(FLAGS.json).write_text(json.dumps({"paper": paper, "mlrc": mlrc, "table": table,
                                            "seconds": seconds}, indent=1, allow_nan=False))
  return 0


def _study(config: ml_collections.ConfigDict) -> int:
  from hn_jax.tools import study  # pylint: disable=g-import-not-at-top
  result = study.mlrc(config, FLAGS.root, methods=[m.strip() for m in FLAGS.methods if m.strip()],
                      trials=FLAGS.trials, folds=FLAGS.folds, fold_seed=FLAGS.fold_seed,
                      trial_seed=FLAGS.trial_seed, parallel=FLAGS.parallel,
                      log=lambda s: print(s, file=sys.stderr, flush=True))
  print(f"{result['dataset']}: each loss's best of {FLAGS.trials} trials by validation MAP@R "
        f"({FLAGS.folds} folds), then the test split in percent (fold models concatenated, "
        f"and separate: mean +- std):\n\n{result['table']}")
  print(f"\n{result['seconds'] / 60:.1f} minutes in all", file=sys.stderr)
  if FLAGS.json:
    Path(FLAGS.json).write_text(json.dumps(result, indent=1, allow_nan=False))
  return 0


def _reproduce(_: list[str]) -> int:
  try:
    seeds = [int(s) for s in FLAGS.seeds if s.strip()]
    search_seeds = [int(s) for s in FLAGS.search_seeds if s.strip()]
  except ValueError as e:
    raise ReproduceError(f"--seeds={','.join(FLAGS.seeds)}, --search_seeds="
                         f"{','.join(FLAGS.search_seeds)}: give integers, e.g. --seeds=0,1,2"
                         ) from e
  if FLAGS.json and not Path(FLAGS.json).resolve().parent.is_dir():
    raise ReproduceError(f"--json={FLAGS.json}: its folder does not exist; create it first")
  from absl import logging  # pylint: disable=g-import-not-at-top
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING)  # each run's console lines: one line per run instead
  if FLAGS.protocol != "paper":
    config = ml_collections.ConfigDict(FLAGS.config.to_dict())
    try:
      return (_study(config) if FLAGS.protocol == "mlrc"
              else _both(config, seeds, search_seeds))
    finally:
      logging.set_verbosity(verbosity)
  try:
    result = reproduce(ml_collections.ConfigDict(FLAGS.config.to_dict()), FLAGS.root,
                       methods=[m.strip() for m in FLAGS.methods if m.strip()],
                       lrs=[x.strip() for x in FLAGS.lrs if x.strip()],
                       seeds=seeds, search_seeds=search_seeds, figures=FLAGS.figures,
                       parallel=FLAGS.parallel,
                       log=lambda s: print(s, file=sys.stderr, flush=True))
  finally:
    logging.set_verbosity(verbosity)
  print(f"Learning-rate search (final test R@1 in percent, mean over the search seeds "
        f"(each seed); bold: chosen):\n\n"
        f"{result['search_table']}\n\n{result['dataset']}: final test recall in percent, "
        f"mean +- std over {len(seeds)} seeds:\n\n{result['table']}")
  print(f"\n{result['seconds'] / 60:.1f} minutes in all", file=sys.stderr)
  if FLAGS.json:
    Path(FLAGS.json).write_text(json.dumps(result, indent=1, allow_nan=False))
  for f in result.get("figures", []):
    print(f"{PROG}: wrote {f}", file=sys.stderr)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """The command line (without the program name); returns the exit status."""
  return cli.run(_reproduce, FLAGS, argv, prog=PROG, doc=__doc__, required=("root",),
                 errors=(ReproduceError, report.ReportError, ValueError))


if __name__ == "__main__":
  sys.exit(main())
