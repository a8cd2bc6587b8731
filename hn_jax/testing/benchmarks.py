"""What the tests of `benchmarks/` share: a script loaded as a module, a quick-compile env."""

from __future__ import annotations

import importlib.util
import os
import types

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "benchmarks")


def load(name: str) -> types.ModuleType:
  """benchmarks/<name>.py of this checkout, imported afresh (each call runs the file)."""
  spec = importlib.util.spec_from_file_location(f"benchmark_{name}",
                                                os.path.join(BENCHMARKS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def quick_compile_env(**extra: str) -> dict[str, str]:
  """This process's environment for a benchmark's smoke subprocess on a busy CPU: JAX on the
  CPU, XLA's backend optimization level 0 and one OpenMP thread (torch), which only make the
  compiles quicker (no figure of a smoke run means anything), plus `extra`."""
  flags = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
  return dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1", XLA_FLAGS=flags, **extra)
