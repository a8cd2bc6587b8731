"""The paper's table on an in-memory dataset: a learning-rate search, the seeds, the table.

Usage::

    python -m hn_jax.reproduce --root=/tmp/hn_table [--config=configs/synthetic.py]
        [--methods=hn,shn,sct] [--lrs=0.3,1,3] [--seeds=0,1,2,3,4] [--search_seeds=0,1]
        [--figures=docs/synthetic] [--json=FILE.json] [--config.KEY=VALUE ...]

1. Search: every method at every learning rate of ``--lrs``, with the ``--search_seeds``.
2. Choice, per method (the paper kept the best learning rate of each method): the rate with
   the highest mean final test R@1 over the search seeds among the rates where no search
   run collapsed; where every rate had a collapse, the highest mean all the same (the table
   then says ``collapse`` if every seed collapses). Ties go to the smaller rate. Like the
   paper, this chooses on the test split (there is no validation split).
3. Seeds: the chosen rate of each method with every seed of ``--seeds`` (the search runs of
   those seeds are reused: same config, same seed, the same run).
4. The table (mean +- sample std over seeds of the final test R@1/2/4/8, in percent, or
   ``collapse`` where every seed collapsed; `hn_jax.report`'s rule) and, with
   ``--figures=PREFIX``, ``PREFIX_hn_ratio.png`` and ``PREFIX_recall.png``.

Every run is an ordinary hn_jax run in the release's layout,
``ROOT/<DATA>_R50/<method>_B<batch>_R<repeat>_D<dim>_lr<lr>_lam<lam>/<seed>/``, run in this
process one after another; `python -m hn_jax.report ROOT/<DATA>_R50` reads them too. Running
the command again on the same root skips finished runs and resumes interrupted ones (or
lengthens them, for a larger ``--config.num_epochs``); a root holding runs of another config
is refused (`hn_jax.run_config`'s rule). Compiled programs are cached in ``ROOT/xla_cache``
(unless ``JAX_COMPILATION_CACHE_DIR`` says where), so the seeds of a method compile once.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from hn_jax import report

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


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """`get_config()` of a config file, with ``KEY=VALUE`` overrides (Python literals)."""
  if not os.path.isfile(path):
    raise ReproduceError(f"--config={path}: no such file; give a config file such as "
                         "configs/synthetic.py")
  spec = importlib.util.spec_from_file_location("_hn_reproduce_config", path)
  module = importlib.util.module_from_spec(spec)
  repo = str(Path(path).resolve().parents[1])
  if repo not in sys.path:  # config files import `configs.default`
    sys.path.insert(0, repo)
  spec.loader.exec_module(module)
  config = module.get_config()
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep or key not in config:
      raise ReproduceError(f"--config.{item}: not a KEY=VALUE of a setting in {path}")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    if isinstance(config[key], float) and isinstance(value, int):
      value = float(value)
    try:
      config[key] = value
    except (TypeError, ValueError) as e:
      raise ReproduceError(f"--config.{item}: {e}") from e
  return config


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


def _complete(scalars: Mapping[str, Any], config: ml_collections.ConfigDict, key: str) -> bool:
  """Whether a run's scalars already hold its final test recall."""
  series = scalars.get(f"{key}_test_R_1", [])
  return bool(series) and series[-1][0] == config.num_epochs


def train_run(config: ml_collections.ConfigDict, workdir: Path, key: str,
              log: Any = print) -> dict[str, Any]:
  """Trains one run (or resumes, or skips it when finished); its final figures."""
  from hn_jax import train  # pylint: disable=g-import-not-at-top  (JAX only when training)
  workdir.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  has_events = any(workdir.glob(report.EVENT_FILE_PREFIX + "*"))
  scalars = report.load_scalars(workdir) if has_events else {}
  reused = _complete(scalars, config, key)
  if not reused:
    train.train_and_evaluate(config, str(workdir))
    scalars = report.load_scalars(workdir)
  r1 = report.last_value(scalars.get(f"{key}_test_R_1"))
  result = {"r1": r1, "collapsed": report.is_collapsed(scalars),
            "mean_sim": report.last_value(scalars.get(report.COLLAPSE_SIM_KEY)),
            "seconds": time.perf_counter() - t0, "reused": reused}
  took = "already done" if reused else f"{result['seconds']:.0f} s"
  log(f"  {config.loss} lr {config.learning_rate:g} seed {config.seed}: test R@1 {_num(r1)}, "
      f"embedding_mean_sim {_num(result['mean_sim'])}"
      f"{' (collapse)' if result['collapsed'] else ''}, {took}")
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
              figures: str | None = None, log: Any = print) -> dict[str, Any]:
  """Search, seeds, table and figures (see the module docstring); returns it all as data."""
  from hn_jax import datasets, losses, run_config  # pylint: disable=g-import-not-at-top
  unknown = [m for m in methods if m not in losses.METHODS]
  if unknown or not methods:
    raise ReproduceError(f"--methods: {','.join(unknown) or 'none given'}; use some of "
                         f"{','.join(losses.METHODS)}")
  for lr in lrs:
    try:
      ok = float(lr) > 0
    except ValueError:
      ok = False
    if not ok:
      raise ReproduceError(f"--lrs: {lr!r} is not a positive learning rate")
  if not lrs or not seeds or not search_seeds:
    raise ReproduceError("--lrs, --seeds and --search_seeds need at least one value each")
  from hn_jax import train  # pylint: disable=g-import-not-at-top
  for method in methods:  # every setting checked before anything compiles
    train.check_config(config_for(config, method, lrs[0], seeds[0]))
  key = datasets.KEYS[config.dataset]
  base = Path(root) / f"{key}_R50"
  import jax  # pylint: disable=g-import-not-at-top
  if not jax.config.jax_compilation_cache_dir:
    # The seeds of a method compile the same programs: compile them once.
    jax.config.update("jax_compilation_cache_dir", str(Path(root).resolve() / "xla_cache"))
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
      f"({total} runs in all)")
  search = []
  for method in methods:
    for lr in lrs:
      done = [train_run(config_for(config, method, lr, seed), workdir(method, lr, seed), key,
                        log) for seed in search_seeds]
      r1s = tuple(math.nan if d["r1"] is None else d["r1"] for d in done)
      search.append(SearchResult(method, lr, float(sum(r1s) / len(r1s)),
                                 any(d["collapsed"] for d in done), r1s))
  chosen = {m: choose([r for r in search if r.method == m]).lr for m in methods}
  log("chosen: " + ", ".join(f"{m} lr {lr}" for m, lr in chosen.items()))
  for method, lr in chosen.items():
    for seed in seeds:
      train_run(config_for(config, method, lr, seed), workdir(method, lr, seed), key, log)

  groups = report.load_groups([base / group_name(config, m, lr) for m, lr in chosen.items()])
  # Only the chosen seeds: a search seed outside --seeds is not averaged.
  keep = {str(s) for s in seeds}
  named = {m: (group_name(config, m, lr), lr) for m, lr in chosen.items()}
  groups = {g: [r for r in groups[g] if r.name in keep] for g, _ in named.values()}
  rows = report.summarize(groups)
  result = {
      "dataset": key, "root": str(root), "methods": list(methods), "lrs": list(lrs),
      "seeds": list(seeds), "search_seeds": list(search_seeds),
      "search": [dataclasses.asdict(r) for r in search], "chosen": chosen,
      "rows": [{k: report.json_safe(v) for k, v in r.items()} for r in rows],
      "search_table": search_table(search, chosen, search_seeds),
      "table": paper_table(rows, named, key),
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


def main(argv: Sequence[str] | None = None) -> int:
  """Command line entry point; returns the exit status."""
  parser = argparse.ArgumentParser(
      prog="python -m hn_jax.reproduce", description=__doc__.split("\n\n", 1)[0],
      epilog=__doc__[__doc__.index("1. Search"):],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--root", required=True, help="where the runs go (release layout)")
  parser.add_argument("--config", default="configs/synthetic.py", help="config file")
  parser.add_argument("--methods", default="hn,shn,sct", help="comma-separated losses")
  parser.add_argument("--lrs", default="0.3,1,3",
                      help="learning rates searched, comma-separated, as typed in folder names")
  parser.add_argument("--seeds", default="0,1,2,3,4", help="seeds of the table")
  parser.add_argument("--search_seeds", default="0,1", help="the seeds of the search runs")
  parser.add_argument("--figures", metavar="PREFIX",
                      help="write PREFIX_hn_ratio.png and PREFIX_recall.png")
  parser.add_argument("--json", metavar="FILE", help="also write everything as JSON here")
  args, rest = parser.parse_known_args(argv)
  overrides = []
  for item in rest:
    if not item.startswith("--config."):
      parser.error(f"unrecognized argument {item}; settings are --config.KEY=VALUE")
    overrides.append(item[len("--config."):])
  try:
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    search_seeds = [int(s) for s in args.search_seeds.split(",") if s.strip()]
  except ValueError:
    parser.error(f"--seeds={args.seeds}, --search_seeds={args.search_seeds}: give integers, "
                 "e.g. --seeds=0,1,2")
  if args.json and not Path(args.json).resolve().parent.is_dir():
    print(f"hn_jax.reproduce: error: --json={args.json}: its folder does not exist; create it "
          "first", file=sys.stderr)
    return 2
  from absl import logging  # pylint: disable=g-import-not-at-top
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING)  # each run's console lines: one line per run instead
  try:
    config = load_config(args.config, overrides)
    result = reproduce(config, args.root,
                       methods=[m.strip() for m in args.methods.split(",") if m.strip()],
                       lrs=[x.strip() for x in args.lrs.split(",") if x.strip()],
                       seeds=seeds, search_seeds=search_seeds, figures=args.figures,
                       log=lambda s: print(s, file=sys.stderr, flush=True))
  except (ReproduceError, report.ReportError, ValueError) as e:  # train.ConfigError too
    print(f"hn_jax.reproduce: error: {e}", file=sys.stderr)
    return 2
  finally:
    logging.set_verbosity(verbosity)
  print(f"Learning-rate search (final test R@1 in percent, mean over the search seeds "
        f"(each seed); bold: chosen):\n\n"
        f"{result['search_table']}\n\n{result['dataset']}: final test recall in percent, "
        f"mean +- std over {len(seeds)} seeds:\n\n{result['table']}")
  print(f"\n{result['seconds'] / 60:.1f} minutes in all", file=sys.stderr)
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=1, allow_nan=False))
  for f in result.get("figures", []):
    print(f"hn_jax.reproduce: wrote {f}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
