"""What the TensorBoard views (hn_jax.summaries: projector, neighbour sheet, HParams) cost.

    python benchmarks/tensorboard_views.py            # SOP-sized synthetic test set, the cap
    python benchmarks/tensorboard_views.py --digits   # also: configs/digits.py with and without
    python benchmarks/tensorboard_views.py --smoke    # tiny sizes, to check the script

Synthetic: a test split of `--points` embeddings (default 60,502 x 128, SOP's test set, ~5.3
images per class) and eval crops of `--image_size` pixels (224) drawn from a pool of 64
random images (views into it, as a memory cache gives them). Timed, per stage, what
`RunSummaries.evaluated` does: at the first evaluation that writes the projector, the sample
(`--cap` points, default config.projector_points), its thumbnails, the sprite and metadata;
at every one, the tensor file and the neighbour sheet (8 queries x 8 neighbours against the
whole split, PNG-encoded as the image summary is).

--digits: `python -m hn_jax.main --config=configs/digits.py` back to back, in fresh processes
and workdirs: the views off (projector_points=0, neighbour_queries=0) then on (the defaults),
`--rounds` times, the order swapped every other round; wall time of each and the mean
evaluation time its console account prints, and the seconds spent inside the views (timed in
the run's own process, so that the share does not depend on the load).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def synthetic(points: int, dim: int, image_size: int, cap: int, folder: str) -> dict:
  """Seconds of each stage of the views for a synthetic test split."""
  from PIL import Image
  from hn_jax import summaries
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(-(-points // 5.35)), 6)[:points].astype(np.int64)
  labels = rng.permutation(labels)
  embeddings = rng.normal(size=(points, dim)).astype(np.float32)
  pool = rng.integers(0, 256, size=(64, image_size, image_size, 3), dtype=np.uint8)

  def images(rows):
    return [pool[int(i) % len(pool)] for i in rows]  # views, as a memory cache gives

  times = {}

  def timed(name, fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    times[name] = time.perf_counter() - t
    return out

  rows = timed("sample", summaries.sample_points, labels, cap)
  thumb = summaries.sprite_thumb(len(rows))
  crops = timed("gather images", images, rows)
  thumbs = timed("thumbnails", summaries.square_thumbnails, crops, thumb)
  timed("sprite and metadata", summaries.write_projector_points, folder,
        {"label": labels[rows], "index": rows}, thumbs)
  timed("tensor file", summaries.add_projector_tensor, folder, "test_epoch_1", embeddings[rows],
        thumb)
  queries = timed("queries", summaries.query_indices, labels, 8)
  top = timed("nearest", summaries.nearest, embeddings[queries], embeddings,
              summaries.NEIGHBOURS_K, queries)
  sheet = timed("neighbour sheet", summaries.neighbour_sheet, images(queries), labels[queries],
                top, images, labels)

  def encode():
    with io.BytesIO() as f:
      Image.fromarray(sheet).save(f, format="PNG")
      return f.tell()
  timed("sheet PNG", encode)
  once = ("sample", "gather images", "thumbnails", "sprite and metadata")
  every = ("tensor file", "queries", "nearest", "neighbour sheet", "sheet PNG")
  sizes = {p.name: p.stat().st_size for p in (Path(folder) / summaries.PROJECTOR_DIR).iterdir()}
  return {"points": points, "dim": dim, "image_size": image_size, "cap": cap,
          "sampled": int(len(rows)), "thumb": thumb, "stages": times,
          "first_evaluation_s": sum(times[k] for k in once + every),
          "later_evaluation_s": sum(times[k] for k in every), "file_bytes": sizes}


_DIGITS_RUN = r"""
import json, sys, time
from hn_jax import main, summaries
spent = {"views_s": 0.0}
for name in ("started", "evaluated", "finished"):
  def timed(self, *args, _method=getattr(summaries.RunSummaries, name), **kwargs):
    t = time.perf_counter()
    _method(self, *args, **kwargs)
    spent["views_s"] += time.perf_counter() - t
  setattr(summaries.RunSummaries, name, timed)
t = time.perf_counter()
status = main.main(sys.argv[1:])
spent["wall_s"] = time.perf_counter() - t
print("RESULT " + json.dumps(spent))
sys.exit(status)
"""


def digits_run(views: bool, workdir: str) -> dict:
  """One configs/digits.py run (`hn_jax.main`, a fresh process): its wall seconds, the
  seconds spent in the views' methods (RunSummaries; the image summaries' PNG encoding runs
  in CLU's writer thread and is not in them), and the evaluations' mean seconds."""
  args = [sys.executable, "-c", _DIGITS_RUN, "--config=configs/digits.py",
          f"--workdir={workdir}"]
  if not views:
    args += ["--config.projector_points=0", "--config.neighbour_queries=0"]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO))
  proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, check=True)
  out = proc.stdout + proc.stderr
  spent = json.loads(re.findall(r"RESULT (.*)", out)[-1])
  evals = [float(s) for s in re.findall(r"evaluation: .*\(([\d.]+) s\)", out)]
  return {"views": views, "wall_s": spent["wall_s"], "views_s": spent["views_s"],
          "evaluations": len(evals),
          "mean_evaluation_s": float(np.mean(evals)) if evals else None,
          "evaluation_s": evals, "load": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--points", type=int, default=60502)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--cap", type=int, default=None, help="default: config.projector_points")
  parser.add_argument("--digits", action="store_true", help="also time configs/digits.py")
  parser.add_argument("--rounds", type=int, default=1,
                      help="--digits pairs; odd rounds run off then on, even ones on then off")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes (tests the script)")
  parser.add_argument("--json", default="", help="also write the results here")
  args = parser.parse_args(argv)
  from hn_jax import run_config
  cap = args.cap if args.cap is not None else run_config.defaults().projector_points
  if args.smoke:
    args.points, args.dim, args.image_size, cap = 600, 16, 32, 100
  result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "smoke": args.smoke,
            "load_before": os.getloadavg()[0]}
  with tempfile.TemporaryDirectory() as tmp:
    result["synthetic"] = synthetic(args.points, args.dim, args.image_size, cap, tmp)
  s = result["synthetic"]
  print(f"synthetic test split {s['points']} x {s['dim']}, crops {s['image_size']} px, "
        f"{s['sampled']} projector points, {s['thumb']} px thumbnails")
  for name, seconds in s["stages"].items():
    print(f"  {name:22s} {seconds:8.3f} s")
  print(f"  first evaluation       {s['first_evaluation_s']:8.3f} s (projector points written)")
  print(f"  each later evaluation  {s['later_evaluation_s']:8.3f} s")
  print(f"  files: {s['file_bytes']}")
  if args.digits and not args.smoke:
    runs = []
    for views in [v for r in range(args.rounds) for v in ((False, True), (True, False))[r % 2]]:
      with tempfile.TemporaryDirectory() as workdir:
        runs.append(digits_run(views, workdir))
      r = runs[-1]
      print(f"digits, views {'on ' if views else 'off'}: {r['wall_s']:.1f} s wall, "
            f"{r['views_s']:.2f} s in the views ({100 * r['views_s'] / r['wall_s']:.1f} %), "
            f"{r['evaluations']} evaluations of {r['mean_evaluation_s']:.2f} s on average, "
            f"load {r['load']:.1f}")
    result["digits"] = runs
  result["load_after"] = os.getloadavg()[0]
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
