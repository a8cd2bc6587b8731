"""Benchmark of exact retrieval recall (hn_jax.evaluation) against faiss-cpu IndexFlatIP.

    pip install faiss-cpu==1.15.1   # for the faiss rows only; the tests never need faiss
    python benchmarks/evaluation.py                 # CPU sizes (~15 min per round on 2 cores)
    python benchmarks/evaluation.py --gpu-sizes     # accelerator sizes (run on the GPU host)
    python benchmarks/evaluation.py --smoke         # tiny sizes, to check the script

Cases (random embeddings with class structure: 5 images per class around random class
centres, the centre scaled so recall is far from 0 and 1):
  CPU: self-retrieval (leave-one-out) of 20,000 and 60,502 embeddings of dim 512, recall at
       1, 10, 100, 1000; 18,000 queries against a 200,000 gallery of dim 256, recall at 1, 10,
       100 (Hotels-50K's instance Ks).
  GPU: self-retrieval of 60,502 x 512 (SOP's test set); 17,954 queries against a 1,027,871
       gallery of dim 256 (Hotels-50K), recall at 1, 10, 100.

Methods, each in its own subprocess (so that peak memory is per method):
  ours        hn_jax.evaluation.recall_at_k on NumPy input, default budget (2 GiB); on a CPU
              mesh that is its host path (NumPy BLAS + threads). "first" is the first call
              (includes XLA compilation and the transfer of the embeddings to the devices);
              "steady" a second, identical call (still includes that transfer: the API takes
              host arrays). With --gpu-sizes (or --device-loop) also "device": the rank
              computation alone, best of 3, compiled, with the gallery already on the devices
              (it excludes the transfer of the gallery; query blocks are still sent and the
              ranks fetched per block).
  ours-jit    the same with the jitted kernels (the accelerator path) forced on a CPU mesh.
  faiss       faiss.IndexFlatIP: normalize a copy, add the gallery, search k = the largest K
              (+ 1 for self-retrieval, whose own entry is dropped), then the same recall from
              its neighbour lists with NumPy. All of it is timed.
  faiss-k100  the same for the Ks up to 100 only (a search of k = 101 at most): the cheaper
              search a user who skips R@1000 would run; ours costs the same for any K.
  numpy-gemm  a floor for ours on CPU: q @ g.T with NumPy's BLAS in blocks of at most 2**26
              entries, results discarded (no counting, no search).
  xla-gemm    a floor for ours-jit: the same jitted float32 matmul in the same blocks (on CPU
              ~2**23 similarities), results discarded; ours-jit minus this is the cost of the
              count, the gather of the best correct similarity and the per-block host work.
Time: wall seconds of the call. Peak memory: ru_maxrss of the subprocess at the end minus
ru_maxrss just before the timed calls (after imports and generating the embeddings, which are
generated in chunks so that generation leaves no higher mark): the resident high-water mark the
method added beyond the embeddings and libraries, XLA's compilation included. On accelerators
"device" in the peak column is the device's peak_bytes_in_use.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CPU_CASES = {
    "self-20000x512": dict(queries=20_000, gallery=None, dim=512, ks=(1, 10, 100, 1000)),
    "self-60502x512": dict(queries=60_502, gallery=None, dim=512, ks=(1, 10, 100, 1000)),
    "18000x200000x256": dict(queries=18_000, gallery=200_000, dim=256, ks=(1, 10, 100)),
}
GPU_CASES = {
    "self-60502x512": dict(queries=60_502, gallery=None, dim=512, ks=(1, 10, 100, 1000)),
    "17954x1027871x256": dict(queries=17_954, gallery=1_027_871, dim=256, ks=(1, 10, 100)),
}
SMOKE_CASES = {
    "self-3000x128": dict(queries=3_000, gallery=None, dim=128, ks=(1, 10, 100)),
    "1000x8000x64": dict(queries=1_000, gallery=8_000, dim=64, ks=(1, 10)),
}
PER_CLASS = 5
CHUNK = 8192


def _embeddings(n: int, dim: int, num_classes: int, seed: int, labels=None):
  """Class centre + noise, float32, generated in chunks (no big temporaries)."""
  rng = np.random.default_rng(seed)
  centres = np.random.default_rng(1234).standard_normal((num_classes, dim), dtype=np.float32)
  # Expected cosine between two images of a class: c = s^2 / (1 + s^2), set a little above the
  # spread of cosines between unrelated ones (~1/sqrt(dim)), so recall is far from 0 and 1.
  c = 3.5 / np.sqrt(dim)
  scale = np.float32(np.sqrt(c / (1 - c)))
  if labels is None:
    labels = rng.integers(0, num_classes, size=n)
  x = np.empty((n, dim), np.float32)
  for start in range(0, n, CHUNK):
    stop = min(start + CHUNK, n)
    x[start:stop] = rng.standard_normal((stop - start, dim), dtype=np.float32)
    x[start:stop] += scale * centres[labels[start:stop]]
  return x, labels


def _data(case: dict):
  """(queries, query labels, gallery or None, gallery labels or None)."""
  dim = case["dim"]
  if case["gallery"] is None:
    n = case["queries"]
    q, qy = _embeddings(n, dim, -(-n // PER_CLASS), 0, np.arange(n) // PER_CLASS)
    return q, qy, None, None
  n = case["gallery"]
  g, gy = _embeddings(n, dim, -(-n // PER_CLASS), 0, np.arange(n) // PER_CLASS)
  q, qy = _embeddings(case["queries"], dim, -(-n // PER_CLASS), 1)
  return q, qy, g, gy


def _maxrss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _recall_from_neighbours(neighbours, qy, gy, ks, exclude_self):
  """Recall@K from each query's nearest gallery indices (nearest first)."""
  if exclude_self:  # drop the query itself (or, if it is not there, the last neighbour)
    own = neighbours == np.arange(len(neighbours))[:, None]
    drop = np.where(own.any(axis=1), own.argmax(axis=1), neighbours.shape[1] - 1)
    keep = np.ones(neighbours.shape, bool)
    keep[np.arange(len(neighbours)), drop] = False
    neighbours = neighbours[keep].reshape(len(neighbours), -1)
  correct = gy[neighbours] == qy[:, None]
  first = np.where(correct.any(axis=1), correct.argmax(axis=1), neighbours.shape[1])
  return {k: float(np.mean(first < k)) for k in ks}


def _normalized(x):
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def worker(case_name: str, method: str, cases: dict, device_loop: bool) -> dict:
  """Runs one method on one case (in its own process) and returns its measurements."""
  case = cases[case_name]
  ks = case["ks"]
  out = {"case": case_name, "method": method}
  if method in ("ours", "ours-jit", "xla-gemm"):
    import jax  # pylint: disable=g-import-not-at-top
    from hn_jax import evaluation  # pylint: disable=g-import-not-at-top
    out["device"] = str(jax.devices()[0].device_kind)
    out["num_devices"] = len(jax.devices())
  elif method in ("faiss", "faiss-k100"):
    import faiss  # pylint: disable=g-import-not-at-top
    out["threads"] = faiss.omp_get_max_threads()
  q, qy, g, gy = _data(case)
  exclude_self = g is None
  out["data_mb"] = (q.nbytes + (0 if g is None else g.nbytes)) / 2**20
  baseline = _maxrss_mb()

  if method in ("ours", "ours-jit"):
    # ours-jit: the jitted kernels (the accelerator path) even on a CPU mesh.
    evaluation._HOST_PATH_ON_CPU = method == "ours"  # pylint: disable=protected-access
    times = []
    for _ in range(2):
      t = time.perf_counter()
      recall = evaluation.recall_at_k(q, qy, ks, g, gy)
      times.append(time.perf_counter() - t)
    out.update(first_s=times[0], steady_s=times[1], recall=recall)
    if device_loop:
      plan = evaluation._Plan(q, qy, g, gy, mesh=None)  # pylint: disable=protected-access
      jax.block_until_ready(plan.gallery)
      device_times = []
      for _ in range(3):
        t = time.perf_counter()
        evaluation._ranks(plan, evaluation.DEFAULT_MAX_BYTES)  # pylint: disable=protected-access
        device_times.append(time.perf_counter() - t)
      out["device_s"] = min(device_times)
      stats = jax.devices()[0].memory_stats() or {}
      if "peak_bytes_in_use" in stats:
        out["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
  elif method == "xla-gemm":
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    plan = evaluation._Plan(q, qy, g, gy, mesh=None)  # pylint: disable=protected-access
    rows = plan.block_rows(evaluation.DEFAULT_MAX_BYTES, 4 * plan.num_gallery,
                           evaluation._cpu_rows(plan), plan.num_queries)  # pylint: disable=protected-access
    gemm = jax.jit(lambda a, b: jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST))
    blocks = [jnp.asarray(q[start:start + rows]) for start in range(0, len(q), rows)]
    gallery = plan.gallery["vectors"]
    jax.block_until_ready(gemm(blocks[0], gallery))
    jax.block_until_ready(gemm(blocks[-1], gallery))
    t = time.perf_counter()
    for block in blocks:
      jax.block_until_ready(gemm(block, gallery))
    out.update(steady_s=time.perf_counter() - t, block_rows=rows)
  elif method in ("faiss", "faiss-k100"):
    if method == "faiss-k100":  # a cheaper search: only the recalls at K <= 100
      ks = [k for k in ks if k <= 100]
    t = time.perf_counter()
    gallery = q if g is None else g
    index = faiss.IndexFlatIP(q.shape[1])
    gn = np.array(gallery, np.float32)
    faiss.normalize_L2(gn)
    index.add(gn)
    del gn
    qn = np.array(q, np.float32)
    faiss.normalize_L2(qn)
    k = max(ks) + (1 if exclude_self else 0)
    _, neighbours = index.search(qn, k)
    recall = _recall_from_neighbours(neighbours, qy, qy if g is None else gy, ks, exclude_self)
    out.update(steady_s=time.perf_counter() - t, recall=recall, k=k)
  elif method == "numpy-gemm":
    qn = _normalized(q)
    gn = qn if g is None else _normalized(g)
    rows = max(1, 2**26 // len(gn))
    t = time.perf_counter()
    for start in range(0, len(qn), rows):
      qn[start:start + rows] @ gn.T  # pylint: disable=pointless-statement
    out.update(steady_s=time.perf_counter() - t)
  else:
    raise ValueError(f"unknown method {method}")
  out["peak_mb"] = _maxrss_mb() - baseline
  return out


def machine() -> str:
  model = "unknown"
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  load = " ".join(f"{x:.2f}" for x in os.getloadavg())
  return (f"{datetime.datetime.now().isoformat(timespec='minutes')}, nproc={os.cpu_count()}, "
          f"CPU: {model}, Python {platform.python_version()}, load average: {load}")


def _fmt(x, spec=".2f"):
  return "-" if x is None else format(x, spec)


def table(results: list[dict]) -> str:
  lines = ["| case | method | first s | steady s | device s | peak MB | recall |",
           "|---|---|---|---|---|---|---|"]
  for r in results:
    if "error" in r:
      lines.append(f"| {r['case']} | {r['method']} | error: {r['error']} | | | | |")
      continue
    recall = ", ".join(f"R@{k}={v:.4f}" for k, v in r.get("recall", {}).items())
    peak = _fmt(r.get("peak_mb"), ".0f")
    if "device_peak_mb" in r:
      peak += f" (device {r['device_peak_mb']:.0f})"
    lines.append(f"| {r['case']} | {r['method']} | {_fmt(r.get('first_s'))} | "
                 f"{_fmt(r.get('steady_s'))} | {_fmt(r.get('device_s'), '.3f')} | {peak} | "
                 f"{recall} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--gpu-sizes", action="store_true", help="the accelerator cases")
  parser.add_argument("--smoke", action="store_true", help="tiny cases, to test the script")
  parser.add_argument("--cases", default="", help="comma-separated subset of the case names")
  parser.add_argument("--methods", default="", help="comma-separated subset of the methods")
  parser.add_argument("--rounds", type=int, default=1,
                      help="repeat every method this many times, interleaved (noisy hosts)")
  parser.add_argument("--device-loop", action="store_true",
                      help="also time the rank computation alone (always on with --gpu-sizes)")
  parser.add_argument("--json", default="", help="also write the raw results here")
  parser.add_argument("--worker", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  cases = SMOKE_CASES if args.smoke else GPU_CASES if args.gpu_sizes else CPU_CASES
  if args.worker:
    print(json.dumps(worker(*args.worker, cases, args.device_loop or args.gpu_sizes)))
    return
  default_methods = (["ours", "xla-gemm"] if args.gpu_sizes
                     else ["ours", "faiss", "faiss-k100", "numpy-gemm"])
  methods = args.methods.split(",") if args.methods else default_methods
  names = args.cases.split(",") if args.cases else list(cases)
  flags = ["--gpu-sizes"] if args.gpu_sizes else ["--smoke"] if args.smoke else []
  flags += ["--device-loop"] if args.device_loop else []
  print(machine(), flush=True)
  results = []

  def write(complete: bool) -> None:  # after every result: a run cut short keeps what it has
    if args.json:
      Path(args.json).write_text(json.dumps(
          {"machine": machine(), "results": results, "complete": complete}, indent=1))

  for name in names:
    for _ in range(args.rounds):
      for method in methods:
        proc = subprocess.run([sys.executable, __file__, *flags, "--worker", name, method],
                              capture_output=True, text=True, cwd=REPO, check=False)
        if proc.returncode:
          last = (proc.stderr.strip().splitlines() or ["?"])[-1]
          result = {"case": name, "method": method, "error": last[:200]}
        else:
          result = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(result)
        print(json.dumps(result), flush=True)
        write(complete=False)
  print(machine(), flush=True)
  print()
  print(table(results))
  write(complete=True)


if __name__ == "__main__":
  main()
