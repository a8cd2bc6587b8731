"""Every test process simulates 8 CPU devices, so sharded code runs as on a multi-GPU host.

Compiled programs go to a persistent cache shared by the session's processes (subprocesses
inherit the environment), so a program compiled by one test is reused by the next.
"""

import os
import signal
import tempfile

# A suite started in the background of a non-interactive shell inherits SIGINT ignored, which
# Python then keeps and bash scripts cannot trap: the Ctrl-C tests need Python's default.
signal.signal(signal.SIGINT, signal.default_int_handler)

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="hn_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402  (after the environment above, which JAX reads when imported)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """hn_jax.testing.runs.tiny_config()'s run (2 epochs, checkpoints at steps 0, 14, 28),
  trained once per session: (workdir, final metrics). Shared: tests only read it (or copy it).
  """
  from hn_jax import train  # pylint: disable=import-outside-toplevel
  from hn_jax.testing import runs  # pylint: disable=import-outside-toplevel
  workdir = tmp_path_factory.mktemp("tiny_run")
  metrics = train.train_and_evaluate(runs.tiny_config(), str(workdir))
  return workdir, metrics


# Fixtures that train a run or start a multi-process job: a test that uses one (directly or
# through another fixture) is slow, whatever its own body does.
SLOW_FIXTURES = frozenset({"tiny_run", "tpu_report"})  # a run; a TPU compile of a model


def pytest_collection_modifyitems(items):
  for item in items:
    if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.slow)
