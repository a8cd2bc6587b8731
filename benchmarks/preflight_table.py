"""The preflight's table for RESULTS.md: the paper's configs on the accelerators one would rent.

  python benchmarks/preflight_table.py --out=/tmp/preflight [--configs=cub,sop] \
      [--targets=v4-8,v5e:4x4,...] [--search=v5e:4x4,h200:1] [--smoke]

Each (config, target) is `hn_jax.preflight.run_preflight` of the config with bf16 compute
(the paper's settings otherwise), no accelerator needed; its report is saved as
OUT/<config>@<target>.json and reused when there, so a long table can be built in several
runs (or several processes, one per target). Prints the markdown table. --smoke: the small
configs/digits.py at 16 px on one TPU target, train step only (seconds).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hn_jax import preflight  # noqa: E402  (after the path)

CONFIGS = ("cub", "car", "sop", "inshop", "hotel")
TARGETS = ("v4-8", "v5e:4x4", "v5e:8x8", "v5p-8", "h100:8", "h200:1")


def config_of(name: str, smoke: bool):
  """configs/<name>.py's config (`vit_s16:cub`: its `get_config("cub")`), in bf16; --smoke:
  configs/digits.py at 16 px, as it is."""
  module, _, argument = name.partition(":")
  get_config = importlib.import_module(f"configs.{module}").get_config
  config = get_config(argument) if argument else get_config()
  if smoke:
    config.update(image_size=16, batch_size=16, eval_batch_size=64)
  else:
    config.half_precision = True
  return config


def report_of(name: str, target: str, out: str, *, search: bool, smoke: bool,
              cache_dir: str, evaluation: bool = True) -> dict:
  path = os.path.join(out, f"{name.replace(':', '-')}@{target}.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  print(f"preflight_table: {name} on {target} ...", file=sys.stderr, flush=True)
  report = preflight.run_preflight(config_of(name, smoke), target, search_batch=search,
                                   evaluation=evaluation and not smoke,
                                   say=lambda line: print(line, file=sys.stderr, flush=True),
                                   cache_dir=cache_dir)
  report["config"] = name
  with open(path + ".tmp", "w") as f:
    json.dump(report, f, indent=1)
  os.replace(path + ".tmp", path)
  return report


def table(reports: list[dict]) -> str:
  gib = 1024**3
  rows = ["| config | target | chips | batch/chip | fits | train peak/chip (headroom) | "
          "embed peak/chip | largest batch/chip | GFLOP/image | roofline images/s/chip | "
          "compile s (train, embed, eval) |",
          "|---|---|---:|---:|---|---|---:|---:|---:|---:|---|"]
  for r in reports:
    programs = {p["name"]: p for p in r["programs"]}
    train, embed = programs["train"], programs.get("embed")
    usable = r["usable_memory_bytes"]
    peak = (f"{train['peak_bytes'] / gib:.2f} GiB ({100 * (1 - train['peak_bytes'] / usable):.0f}%)"
            if train["peak_bytes"] else "refused")
    largest = r.get("largest_batch")
    largest = ("" if not largest else
               f"{'>= ' if largest['at_least'] else ''}{largest['batch_per_chip']} "
               f"({largest['compiles']} compiles, {largest['seconds']:.0f} s)")
    roof = train.get("roofline", {})
    evals = sum(p["compile_seconds"] for n, p in programs.items() if n not in ("train", "embed"))
    embed_peak = f"{embed['peak_bytes'] / gib:.2f} GiB" if embed and embed["peak_bytes"] else "-"
    rows.append(
        f"| {r['config']} | {r['topology']} | {r['chips']} | {train['batch_per_chip']} | "
        f"{'yes' if r['fits'] else 'NO'} | {peak} | {embed_peak} | {largest} | "
        f"{train.get('flops_per_image', 0) / 1e9:.1f} | "
        f"{roof.get('images_per_second') or 0:,.0f} ({roof.get('bound_by') or '-'}) | "
        f"{train['compile_seconds']:.0f}, {embed['compile_seconds'] if embed else 0:.0f}, "
        f"{evals:.0f} |")
  return "\n".join(rows)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=None, help="folder of the reports (reused when there); "
                      "with --smoke, a temporary folder by default")
  parser.add_argument("--configs", default=",".join(CONFIGS))
  parser.add_argument("--targets", default=",".join(TARGETS))
  parser.add_argument("--search", default="", help="targets whose largest batch is searched "
                      "(with the first config: the others share its model and image size)")
  parser.add_argument("--smoke", action="store_true", help="the small model on one TPU target")
  parser.add_argument("--existing", action="store_true", help="print the reports OUT already "
                      "holds (any config and target), compile nothing")
  parser.add_argument("--train_only", action="store_true", help="only the train step (the "
                      "embed step and evaluation kernels take minutes more per target)")
  parser.add_argument("--cache_dir", default=None, help="figures of compiled programs, read "
                      "back when compiled again (default: OUT/programs)")
  args = parser.parse_args(argv)
  if args.smoke:
    args.configs, args.targets, args.search = "digits", "v5e:2x2", ""
  if args.out is None:
    if not args.smoke:
      parser.error("--out is required (the folder of the reports)")
    with tempfile.TemporaryDirectory(prefix="preflight_table_smoke_") as tmp:
      return main([*(argv if argv is not None else sys.argv[1:]), f"--out={tmp}"])
  os.makedirs(args.out, exist_ok=True)
  if args.existing:
    reports = []
    for name in sorted(os.listdir(args.out)):
      if name.endswith(".json") and "@" in name:
        with open(os.path.join(args.out, name)) as f:
          reports.append(json.load(f))
    print(table(reports))
    return 0
  search = set(filter(None, args.search.split(",")))
  configs = args.configs.split(",")
  cache_dir = args.cache_dir or os.path.join(args.out, "programs")
  reports = [report_of(c, t, args.out, search=t in search and c == configs[0], smoke=args.smoke,
                       cache_dir=cache_dir, evaluation=not args.train_only)
             for t in args.targets.split(",") for c in configs]
  print(table(reports))
  return 0


if __name__ == "__main__":
  sys.exit(main())
