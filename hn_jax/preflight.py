"""Before you rent accelerators: compile a config's programs for them, with none attached.

  python -m hn_jax.preflight --config=configs/sop.py --topology=v5e:4x4 [--json=FILE]

XLA compiles for a named TPU slice (libtpu's compile-only devices) or NVIDIA GPUs (the CUDA
plugin, from a target description in hn_jax/target_configs/) on any machine. The preflight
compiles what a run of the config would run there: the train step at the global batch, the
embed step at the evaluation batch and the evaluation's device kernels at the dataset's split
sizes; then prints, per chip, the memory each needs against the chip's (and whether it fits),
the largest per-chip batch whose train step fits, FLOPs per image, the collectives, compile
times and a roofline bound on images/s. Exit 0 when everything fits; 1 with one line naming
what does not; 2 for a config that cannot run there at all (before any compile).

The largest batch: XLA's memory is close to linear in the batch, so two compiles give a line,
the line gives a candidate, and compiles at the candidate and one step above confirm it (a
few compiles instead of a bisection's dozen; each compile of a ResNet50 step takes minutes on
a small CPU). `--search_batch=false` skips it.

No library does this for a training config; MaxText's AOT check is the nearest, for LLMs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import resource
import sys
import time
import warnings
from typing import Any, Callable, Sequence

from absl import flags

from hn_jax import accelerators, cli

PROG = "hn_jax.preflight"
FLAGS = cli.command_flags()
cli.define_config(FLAGS, help_text="The training config to check, e.g. configs/sop.py (with "
                  "its --config.KEY=VALUE overrides, as for training).")
flags.DEFINE_string("topology", None, "The target: " + accelerators.TOPOLOGY_HELP + ".",
                    flag_values=FLAGS)
flags.DEFINE_string("json", None, "Also write the report as JSON to this file.",
                    flag_values=FLAGS)
flags.DEFINE_bool("search_batch", True, "Find the largest per-chip batch whose train step fits "
                  "(a few more compiles).", flag_values=FLAGS)
flags.DEFINE_bool("evaluation", True, "Also compile the embed step and the evaluation's "
                  "kernels.", flag_values=FLAGS)
flags.DEFINE_string("cache_dir", None, "Keep each compiled program's figures here and read "
                    "them back when the same program is compiled for the same chip again.",
                    flag_values=FLAGS)

# Queries and gallery of each dataset's evaluation (docs/datasets.md; None: leave-one-out).
EVAL_SPLITS = {"cub": (5924, None), "cars": (8131, None), "sop": (60502, None),
               "inshop": (14218, 12612), "hotels50k": (17954, 1027871),
               "digits": (896, None)}
# Classes a loss with a parameter per class is built for (the training labels' max + 1; for
# In-shop and Hotels-50K, whose labels number every split's items, the count over all splits).
TRAIN_CLASSES = {"cub": 100, "cars": 98, "sop": 11318, "inshop": 7982, "hotels50k": 50000,
                 "digits": 5}
# MAP@R ranks the top k = the largest class's size, which is data; this bound is compiled.
EVAL_TOP_K = 100
# The batch search stops at this many times the configured per-chip batch, or at
# SEARCH_CEILING_MIN per chip if that is more.
SEARCH_CEILING = 16
SEARCH_CEILING_MIN = 1024


@dataclasses.dataclass
class Program:
  """One compiled program's figures, per chip."""

  name: str
  batch_per_chip: int
  argument_bytes: int = 0
  temp_bytes: int = 0
  peak_bytes: int = 0
  flops_per_chip: float = 0.0          # XLA's count for the partitioned program
  bytes_accessed_per_chip: float = 0.0  # after fusion (TPU only; 0: not reported)
  collectives: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  compile_seconds: float = 0.0
  refused: str = ""                    # the compiler's own no-fit message (TPU)
  fits: bool = True
  xla_optimal_seconds: float | None = None
  note: str = ""


# ----------------------------------------------------------------------------- compiling


def _collectives(hlo_text: str) -> list[dict[str, Any]]:
  """Count, dtype and bytes (per chip) of each collective in a compiled module's text."""
  sizes = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
           "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
  found: dict[tuple[str, str], dict[str, Any]] = {}
  pattern = re.compile(r"=\s*(\(.*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+"
                       r"(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
                       r"(-start)?\(")
  for line in hlo_text.splitlines():
    match = pattern.search(line)
    if not match:
      continue
    shapes = re.findall(r"([a-z0-9]+)\[([0-9,]*)\]", match.group(1))
    if match.group(3) and match.group(2) != "all-reduce" and len(shapes) >= 2:
      shapes = shapes[len(shapes) // 2:]  # async start: (operands, outputs)
    for dtype, dims in shapes:
      if dtype not in sizes:
        continue
      count = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
      entry = found.setdefault((match.group(2), dtype),
                               {"op": match.group(2), "dtype": dtype, "count": 0, "bytes": 0})
      entry["count"] += 1
      entry["bytes"] += count * sizes[dtype]
  return sorted(found.values(), key=lambda e: -e["bytes"])


_REFUSAL = re.compile(r"(RESOURCE_EXHAUSTED|exceeds available HBM|[Oo]ut of memory|"
                      r"Ran out of memory)")


def compile_program(name: str, lowered: Any, batch_per_chip: int, chip: accelerators.Chip,
                    flops_per_chip: Callable[[], float] | None = None,
                    cache_dir: str | None = None) -> Program:
  """Compiles `lowered` and reads its figures; a compiler refusal for memory is a no-fit.
  `flops_per_chip` counts the FLOPs where the compiler does not. With `cache_dir`, the
  figures of a program compiled before for the same chip (same program text) are read back
  instead (a table of many configs, a search run twice)."""
  key = None
  if cache_dir:
    text = lowered.as_text()
    key = os.path.join(cache_dir, hashlib.sha256((chip.kind + text).encode()).hexdigest()
                       + ".json")
    if os.path.exists(key):
      with open(key) as f:
        program = Program(**json.load(f))
      program.name, program.batch_per_chip = name, batch_per_chip
      program.fits = not program.refused and program.peak_bytes <= chip.usable_memory_bytes
      return program
  program = _compile(name, lowered, batch_per_chip, chip, flops_per_chip)
  if key:
    os.makedirs(cache_dir, exist_ok=True)
    with open(key + ".tmp", "w") as f:
      json.dump(dataclasses.asdict(program), f)
    os.replace(key + ".tmp", key)
  return program


def _compile(name: str, lowered: Any, batch_per_chip: int, chip: accelerators.Chip,
             flops_per_chip: Callable[[], float] | None) -> Program:
  import jax  # pylint: disable=g-import-not-at-top
  program = Program(name, batch_per_chip)
  start = time.perf_counter()
  cache = jax.config.jax_enable_compilation_cache
  try:
    # The persistent cache cannot hold programs for compile-only devices.
    jax.config.update("jax_enable_compilation_cache", False)
    with cli.stderr_silenced(), warnings.catch_warnings():
      warnings.filterwarnings("ignore", "Error reading persistent compilation cache")
      try:
        compiled = lowered.compile()
      except Exception as e:  # pylint: disable=broad-except
        # XLA's GPU compiler, with no GPU to autotune on, can fail to tile a Triton GEMM
        # (seen: ViT-S/16's attention products on H100); cuBLAS GEMMs are what it would
        # otherwise pick among, so compile with those.
        if chip.platform != "cuda" or "tile sizes" not in str(e):
          raise
        compiled = lowered.compile(compiler_options={"xla_gpu_enable_triton_gemm": False})
        program.note = "compiled with cuBLAS GEMMs (XLA could not tile a Triton GEMM)"
  except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError, by message)
    if not _REFUSAL.search(str(e)):
      raise
    program.compile_seconds = time.perf_counter() - start
    program.refused = " ".join(str(e).split())[:300]
    program.fits = False
    return program
  finally:
    jax.config.update("jax_enable_compilation_cache", cache)
  program.compile_seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  program.argument_bytes = int(memory.argument_size_in_bytes)
  program.temp_bytes = int(memory.temp_size_in_bytes)
  program.peak_bytes = int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                           - memory.alias_size_in_bytes + memory.temp_size_in_bytes
                           + memory.generated_code_size_in_bytes)
  program.fits = program.peak_bytes <= chip.usable_memory_bytes
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  if cost:
    program.flops_per_chip = float(cost.get("flops", 0.0))
    program.bytes_accessed_per_chip = float(cost.get("bytes accessed", 0.0))
    optimal = cost.get("optimal_seconds")
    if optimal is not None and optimal > 0:
      program.xla_optimal_seconds = float(optimal)
  if not program.flops_per_chip and flops_per_chip is not None:
    program.flops_per_chip = flops_per_chip()  # the GPU compiler counts none
  program.collectives = _collectives(compiled.as_text())
  return program


# ----------------------------------------------------------------------------- the programs


def _abstract(tree: Any, sharding: Any) -> Any:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


class Programs:
  """Lowers a config's programs on a mesh of compile-only devices."""

  def __init__(self, config: Any, devices: Sequence[Any]):
    from hn_jax import sharding, train_step  # pylint: disable=g-import-not-at-top
    self.config = config
    self.mesh = sharding.create_mesh(devices)
    self.chips = len(devices)
    classes = (config.get("synthetic_classes", 200) // 2 if config.dataset == "synthetic"
               else TRAIN_CLASSES.get(config.dataset, 1))
    self.graphdef, state, self.tx = train_step.abstract_state(config, classes)
    self.state = _abstract(state, sharding.replicated(self.mesh))
    self.batch = sharding.batch_sharding(self.mesh)

  def train(self, batch_per_chip: int) -> Any:
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from hn_jax import train_step  # pylint: disable=g-import-not-at-top
    n, size = batch_per_chip * self.chips, self.config.image_size
    step = train_step.make_train_step(self.graphdef, self.tx, self.config, self.mesh)
    args = (jax.ShapeDtypeStruct((n, size, size, 3), jnp.uint8, sharding=self.batch),
            jax.ShapeDtypeStruct((n,), jnp.int32, sharding=self.batch),
            jax.ShapeDtypeStruct((n,), jnp.bool_, sharding=self.batch))
    return step.jitted.lower(self.state, *args)

  @functools.cached_property
  def _on_one_cpu(self) -> "Programs":
    import jax  # pylint: disable=g-import-not-at-top
    return Programs(self.config, jax.devices("cpu")[:1])

  def hlo_flops(self, program: str, batch_per_chip: int) -> float:
    """FLOPs of `program` ("train" or "embed") at `batch_per_chip` images, counted by XLA on
    the unoptimized program for one CPU device (no compile; the GPU compiler counts none)."""
    one = self._on_one_cpu
    lowered = one.train(batch_per_chip) if program == "train" else one.embed(batch_per_chip)
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0

  def embed(self, batch_per_chip: int | None = None) -> Any:
    """The embed step at `batch_per_chip` images per chip (default: the evaluation batch)."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from hn_jax import train_step  # pylint: disable=g-import-not-at-top
    n = (self.config.eval_batch_size if batch_per_chip is None
         else batch_per_chip * self.chips)
    size = self.config.image_size
    step = train_step.make_embed_step(self.graphdef, self.mesh, self.config)
    return step.lower(self.state, jax.ShapeDtypeStruct((n, size, size, 3), jnp.uint8,
                                                       sharding=self.batch))

  def evaluation(self) -> dict[str, tuple[Any, int]]:
    from hn_jax import evaluation  # pylint: disable=g-import-not-at-top
    queries, gallery = EVAL_SPLITS.get(self.config.dataset, (None, None))
    if queries is None:
      return {}
    return evaluation.lower_kernels(queries, gallery, self.config.embedding_dim,
                                    mesh=self.mesh, max_bytes=self.config.eval_max_bytes,
                                    k=EVAL_TOP_K)


# ----------------------------------------------------------------------------- the report


def batch_step(images_per_class: int, chips: int, hosts: int) -> int:
  """The smallest per-chip batch step that keeps the global batch (and each host's share) a
  multiple of `images_per_class`."""
  step = 1
  while (step * chips) % images_per_class or ((step * chips) // hosts) % images_per_class:
    step += 1
  return step


def largest_batch(programs: Programs, chip: accelerators.Chip, first: Program, step: int,
                  say=lambda line: None, max_compiles: int = 10,
                  ceiling: int | None = None, cache_dir: str | None = None) -> dict[str, Any]:
  """The largest per-chip batch (a multiple of `step`) whose train step fits, by compiling:
  each guess from the memory line through the two largest fitting compiles, bisection where
  the line points outside what is known; at most `ceiling` per chip (a batch that large
  still fitting is reported as "at least"). Returns the batch (0: not even `step` fits), the
  compiles it took and their seconds."""
  start = time.perf_counter()
  compiled = {first.batch_per_chip: first}

  def at(batch: int) -> Program:
    if batch not in compiled:
      say(f"{PROG}: compiling the train step at {batch} per chip")
      compiled[batch] = compile_program("train", programs.train(batch), batch, chip,
                                        lambda: programs.hlo_flops("train", batch), cache_dir)
    return compiled[batch]

  def bounds() -> tuple[int, int | None]:
    fit = [b for b, p in compiled.items() if p.fits]
    over = [b for b, p in compiled.items() if not p.fits]
    return max(fit, default=0), min(over, default=None)

  while len(compiled) <= max_compiles:
    best, over = bounds()
    if over is not None and over - best <= step:
      break
    if best == 0:  # nothing fits yet: halve
      guess = max(step, over // 2 // step * step)
      if guess in compiled:
        break
      at(guess)
      continue
    fitted = sorted((p for p in compiled.values() if p.fits), key=lambda p: p.batch_per_chip)
    guess, from_line = None, False
    if len(fitted) >= 2:
      a, b = fitted[-2], fitted[-1]
      per_image = (b.peak_bytes - a.peak_bytes) / (b.batch_per_chip - a.batch_per_chip)
      if per_image > 0:
        guess = int(b.batch_per_chip + (chip.usable_memory_bytes - b.peak_bytes) / per_image)
        guess = guess // step * step
        from_line = best < guess and (over is None or guess < over)
    if not from_line:
      guess = 2 * best if over is None else (best + over) // 2 // step * step
    guess = max(guess, best + step)
    if over is not None:
      guess = min(guess, over - step)
    if ceiling is not None and guess > ceiling // step * step:
      if best >= ceiling // step * step:
        break
      guess, from_line = ceiling // step * step, False
    at(guess)
    if from_line and compiled[guess].fits and guess + step not in compiled:
      at(guess + step)  # the line's limit fits: does one step more not?
  best, over = bounds()
  return {"batch_per_chip": best, "at_least": over is None or over - best > step,
          "seconds": time.perf_counter() - start, "compiles": len(compiled) - 1}


def roofline(program: Program, chip: accelerators.Chip, half_precision: bool) -> dict[str, Any]:
  """Images/s per chip that the chip's peak compute (and, where XLA reports the bytes, its
  memory bandwidth) allows for this program: a bound, not a forecast."""
  batch = max(1, program.batch_per_chip)
  peak = chip.peak_bf16_flops if half_precision else chip.peak_f32_flops
  bounds = {}
  if program.flops_per_chip:
    bounds["compute"] = peak / (program.flops_per_chip / batch)
  if program.bytes_accessed_per_chip:
    bounds["memory"] = chip.bandwidth / (program.bytes_accessed_per_chip / batch)
  result = {"images_per_second": min(bounds.values()) if bounds else None,
            "bound_by": min(bounds, key=bounds.get) if bounds else None, **{
                f"{k}_bound": v for k, v in bounds.items()}}
  if program.xla_optimal_seconds and bounds:
    xla = batch / program.xla_optimal_seconds
    if xla <= min(bounds.values()) * 1.0001:  # only where it is no faster than the roofline
      result["xla_estimate"] = xla
  return result


def _gib(n: float) -> str:
  if abs(n) < accelerators.GIB / 10:
    return f"{n / 1024**2:.1f} MiB"
  return f"{n / accelerators.GIB:.2f} GiB"


def run_preflight(config: Any, topology_name: str, *, search_batch: bool = True,
                  evaluation: bool = True, say=print,
                  cache_dir: str | None = None) -> dict[str, Any]:
  """Compiles the config's programs for the target; the report (JSON-able); raises
  run_config.ConfigError for a config that cannot run there (before compiling).
  `cache_dir`: see `compile_program`."""
  from hn_jax import run_config  # pylint: disable=g-import-not-at-top
  topology = accelerators.parse_topology(topology_name)
  chip = topology.chip
  with cli.stderr_silenced():  # libtpu and the CUDA plugin log their start-up
    devices = accelerators.compile_only_devices(topology)
  hosts = len({d.process_index for d in devices})
  checked = config.copy_and_resolve_references()
  with checked.unlocked():
    checked.pretrained = ""  # the shapes do not depend on the weights, which are not read
  run_config.validate(checked, num_devices=len(devices), num_processes=hosts)
  report: dict[str, Any] = {
      "topology": topology_name, "chip": chip.kind, "chips": len(devices), "hosts": hosts,
      "usable_memory_bytes": chip.usable_memory_bytes, "model": config.model,
      "batch_size": config.batch_size, "image_size": config.image_size,
      "embedding_dim": config.embedding_dim, "half_precision": bool(config.half_precision),
      "programs": []}
  plural = lambda n, word: f"{n} {word}{'s' if n > 1 else ''}"  # noqa: E731
  say(f"{PROG}: {config.model}, batch {config.batch_size}, {config.image_size} px, "
      f"{'bf16' if config.half_precision else 'float32'} on {topology_name}: "
      f"{plural(len(devices), chip.kind + ' chip')}, {plural(hosts, 'host')}, "
      f"{_gib(chip.usable_memory_bytes)} usable per chip")
  programs = Programs(checked, devices)
  per_chip = config.batch_size // len(devices)
  train = compile_program("train", programs.train(per_chip), per_chip, chip,
                          lambda: programs.hlo_flops("train", per_chip), cache_dir)
  compiled = [train]
  if evaluation:
    eval_per_chip = config.eval_batch_size // len(devices)
    embed = compile_program("embed", programs.embed(), eval_per_chip, chip,
                            lambda: programs.hlo_flops("embed", eval_per_chip), cache_dir)
    compiled.append(embed)
    for name, (lowered, rows) in programs.evaluation().items():
      compiled.append(compile_program(name, lowered, rows, chip, cache_dir=cache_dir))
  for program in compiled:
    entry = dataclasses.asdict(program)
    if program.name in ("train", "embed") and program.fits:
      entry["flops_per_image"] = program.flops_per_chip / max(1, program.batch_per_chip)
      entry["roofline"] = roofline(program, chip, bool(config.half_precision))
    report["programs"].append(entry)
  if search_batch:
    step = batch_step(config.images_per_class, len(devices), hosts)
    report["largest_batch"] = largest_batch(
        programs, chip, train, step, say=say, cache_dir=cache_dir,
        ceiling=max(SEARCH_CEILING * max(step, per_chip), SEARCH_CEILING_MIN))
    report["largest_batch"]["step"] = step
  misfits = [p for p in compiled if not p.fits]
  report["fits"] = not misfits
  report["misfits"] = [_misfit_line(p, chip) for p in misfits]
  return report


def _misfit_line(program: Program, chip: accelerators.Chip) -> str:
  if program.refused:
    return f"the {program.name} program at {program.batch_per_chip} per chip: {program.refused}"
  over = program.peak_bytes - chip.usable_memory_bytes
  return (f"the {program.name} program at {program.batch_per_chip} per chip needs "
          f"{_gib(program.peak_bytes)} of {_gib(chip.usable_memory_bytes)} "
          f"({_gib(over)} over)")


def format_report(report: dict[str, Any]) -> str:
  """The report as the table the command prints."""
  usable = report["usable_memory_bytes"]
  lines = [f"{'program':<12} {'per chip':>8} {'args':>10} {'temp':>10} {'peak':>10} "
           f"{'headroom':>9} {'compile':>8}  fits"]
  for p in report["programs"]:
    if p["refused"]:
      lines.append(f"{p['name']:<12} {p['batch_per_chip']:>8} {'':>10} {'':>10} {'':>10} "
                   f"{'':>9} {p['compile_seconds']:>7.1f}s  no: refused by the compiler")
      continue
    headroom = 100 * (1 - p["peak_bytes"] / usable)
    lines.append(f"{p['name']:<12} {p['batch_per_chip']:>8} {_gib(p['argument_bytes']):>10} "
                 f"{_gib(p['temp_bytes']):>10} {_gib(p['peak_bytes']):>10} {headroom:>8.0f}% "
                 f"{p['compile_seconds']:>7.1f}s  {'yes' if p['fits'] else 'NO'}"
                 + (f"  ({p['note']})" if p.get("note") else ""))
  for p in report["programs"]:
    if p["name"] == "train" and "roofline" in p:
      r = p["roofline"]
      lines.append(f"train step: {p['flops_per_image'] / 1e9:.3g} GFLOP per image; roofline "
                   + (f"{r['images_per_second']:,.0f} images/s per chip ({r['bound_by']} bound)"
                      if r["images_per_second"] else "unknown")
                   + (f"; XLA's estimate {r['xla_estimate']:,.0f}" if "xla_estimate" in r
                      else ""))
      for c in p["collectives"]:
        lines.append(f"  {c['op']} {c['dtype']}: {c['count']} per step, "
                     f"{c['bytes'] / 1024**2:,.1f} MiB per chip")
  if "largest_batch" in report:
    b = report["largest_batch"]
    lines.append(f"largest train batch that fits: {'at least ' if b['at_least'] else ''}"
                 f"{b['batch_per_chip']} per chip "
                 f"({b['batch_per_chip'] * report['chips']} in all; steps of {b['step']}), "
                 f"found in {b['compiles']} more compiles, {b['seconds']:.0f} s")
  return "\n".join(lines)


def _raise_stack_limit_and_reexec(argv: Sequence[str]) -> None:
  """libtpu's compiler overflows an 8 MiB stack on some targets (v6e): run with the largest
  stack this process may have, re-executing itself once if that needs a new process."""
  soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
  if soft == hard or os.environ.get("HN_JAX_PREFLIGHT_REEXEC"):
    return
  resource.setrlimit(resource.RLIMIT_STACK, (hard, hard))
  os.environ["HN_JAX_PREFLIGHT_REEXEC"] = "1"
  sys.stdout.flush()
  os.execv(sys.executable, [sys.executable, "-m", "hn_jax.preflight", *argv])


def _preflight(_: list[str]) -> int:
  topology_name = FLAGS.topology
  report = run_preflight(FLAGS.config, topology_name, search_batch=FLAGS.search_batch,
                         evaluation=FLAGS.evaluation, cache_dir=FLAGS.cache_dir,
                         say=lambda line: print(line, file=sys.stderr, flush=True))
  print(format_report(report), flush=True)
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(report, f, indent=1)
  if not report["fits"]:
    print(f"{PROG}: does not fit on {topology_name}: " + "; ".join(report["misfits"]),
          file=sys.stderr)
    return 1
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """The command line (without the program name); returns the exit status."""
  from hn_jax import run_config  # pylint: disable=g-import-not-at-top
  if argv is None and not cli.wants_help(sys.argv[1:]):  # the command line itself
    _raise_stack_limit_and_reexec(sys.argv[1:])
  return cli.run(_preflight, FLAGS, argv, prog=PROG, doc=__doc__, required=("topology",),
                 errors=(run_config.ConfigError, accelerators.TopologyError))


if __name__ == "__main__":
  sys.exit(main())
