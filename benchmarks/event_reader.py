"""Times three ways to read TensorBoard event files, each in a fresh process.

    python benchmarks/event_reader.py [DIR ...]    # default: ../shared/reference/original-logs
    python benchmarks/event_reader.py --smoke      # 3 small files it writes: tests the script

Readers (all yield every record of every events.out.tfevents.* file below the folders):
  stub      tensorboard's pure-Python record reader (`tensorboard.compat.tensorflow_stub`),
            both CRCs of every record checked: what hn_jax.tools.report uses.
  loader    tensorboard's `RawEventFileLoader`, the layer under `EventFileLoader`: where
            TensorFlow is installed it imports it and reads with TensorFlow's reader.
  report    hn_jax.tools.report.load_scalars (the stub reader plus proto parsing and merging).
The time includes the imports each needs; the table says whether TensorFlow was imported.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(os.path.dirname(REPO), "shared", "reference", "original-logs")

_CODE = r"""
import glob, json, os, sys, time
t0 = time.perf_counter()
which, dirs = sys.argv[1], sys.argv[2:]
files = sorted(f for d in dirs for f in glob.glob(os.path.join(d, "**", "events.out.tfevents.*"),
                                                   recursive=True))
n = 0
if which == "stub":
  from tensorboard.compat.tensorflow_stub import errors, pywrap_tensorflow
  for f in files:
    reader = pywrap_tensorflow.PyRecordReader_New(f)
    while True:
      try:
        reader.GetNext()
      except errors.OutOfRangeError:
        break
      n += 1
elif which == "loader":
  from tensorboard.backend.event_processing import event_file_loader
  for f in files:
    n += sum(1 for _ in event_file_loader.RawEventFileLoader(f).Load())
else:
  from hn_jax.tools import report
  n = sum(len(v) for f in files for v in report.load_scalars(f).values())
print(json.dumps({"reader": which, "files": len(files), "items": n,
                  "seconds": time.perf_counter() - t0,
                  "tensorflow_imported": "tensorflow" in sys.modules}))
"""


def write_events(folder: str, runs: int = 3, steps: int = 50) -> None:
  """`runs` event files of `steps` steps of two scalars each, as TensorBoard writes them."""
  from tensorboard.compat.proto import event_pb2, summary_pb2
  from tensorboard.summary.writer import event_file_writer

  for run in range(runs):
    writer = event_file_writer.EventFileWriter(os.path.join(folder, f"run{run}"))
    for step in range(steps):
      values = [summary_pb2.Summary.Value(tag=tag, simple_value=float(step * (run + 1)))
                for tag in ("loss", "R_1")]
      writer.add_event(event_pb2.Event(step=step, wall_time=1.0 + step,
                                       summary=summary_pb2.Summary(value=values)))
    writer.close()


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("dirs", nargs="*", help=f"folders of event files (default {DEFAULT})")
  parser.add_argument("--smoke", action="store_true",
                      help="read 3 small event files written here (tests the script)")
  parser.add_argument("--json", default="", help="also write the rows here")
  args = parser.parse_args(argv)
  if args.smoke:
    with tempfile.TemporaryDirectory() as tmp:
      write_events(tmp)
      _time_readers([tmp], args.json)
    return
  _time_readers(args.dirs or [DEFAULT], args.json)


def _time_readers(dirs: list[str], json_path: str) -> None:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
  size = sum(os.path.getsize(f) for d in dirs
             for f in glob.glob(os.path.join(d, "**", "events.out.tfevents.*"), recursive=True))
  print(f"{', '.join(dirs)}: {size / 1e6:.2f} MB of event files")
  print(f"{'reader':8s} {'files':>5s} {'items':>7s} {'seconds':>8s}  tensorflow imported")
  rows = []
  for which in ("stub", "loader", "report"):
    out = subprocess.run([sys.executable, "-c", _CODE, which, *dirs], env=env,
                         capture_output=True, text=True, check=True).stdout
    row = json.loads(out.strip().splitlines()[-1])
    rows.append(row)
    print(f"{which:8s} {row['files']:5d} {row['items']:7d} {row['seconds']:8.2f}  "
          f"{row['tensorflow_imported']}")
  if json_path:
    with open(json_path, "w") as f:
      json.dump({"dirs": dirs, "bytes": size, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
