"""Trains an embedding: `python -m hn_jax.main --config=configs/digits.py --workdir=DIR`.

Every setting, with its default and a one-line comment, is in configs/default.py; the
dataset configs (configs/digits.py, cub.py, car.py, sop.py, inshop.py, hotel.py,
synthetic.py) change what differs. Override any of them on the command line, e.g.
`--config.loss=shn --config.seed=3 --config.num_epochs=40`. What the settings reproduce
is described in docs/protocol.md; the datasets' layouts in docs/datasets.md.

The workdir belongs to one run: running the same command again resumes it; settings that
shape the run cannot change then (see hn_jax/run_config.py).

The console shows progress, one line per epoch and per evaluation, and a summary; per-step
scalars go to TensorBoard (`tensorboard --logdir=DIR`). Libraries' INFO logs are hidden
unless --verbosity is given (e.g. --verbosity=0 shows them, --verbosity=1 adds debug).

Several hosts: every process runs the same command. JAX's runtime connects them from
`--coordinator_address`, `--num_processes` and `--process_id`, or by itself on TPU pods
and under SLURM (`--distributed=auto` notices both); see `launch/`.
"""

from __future__ import annotations

import difflib
import glob
import logging as py_logging
import os
import re
import sys
import traceback
from typing import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from hn_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for TensorBoard logs and checkpoints "
                    "(one run per directory; the same command resumes it).")
config_flags.DEFINE_config_file(
    "config", None, "Training configuration file, e.g. configs/digits.py; every setting "
    "is documented in configs/default.py.", lock_config=True)
flags.DEFINE_enum("distributed", "auto", ["auto", "yes", "no"],
                  "Initialize jax.distributed: `auto` does when a coordinator is given or a "
                  "multi-process SLURM job or TPU pod is detected.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host runs).")
flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")

PROG = "hn_jax"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class UsageProblem(ValueError):
  """A mistake on the command line; the message is one line naming it and the fix."""


def _config_path_problem(path: str) -> str:
  known = sorted(glob.glob(os.path.join("configs", "*.py")))
  known = [k for k in known if not k.endswith("__init__.py")]
  close = difflib.get_close_matches(path, known, n=1)
  hint = f"; did you mean {close[0]}?" if close else ""
  listed = f" The configs: {', '.join(known)}." if known else ""
  return f"--config={path}: no such file{hint}{listed}".rstrip()


def _override_problem(error: BaseException) -> str:
  text = " ".join(str(error).replace("\\n", " ").split()).strip("'\"")
  key = re.match(r"'?([^'\s]+)'?", text)
  hint = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"\?', text)
  if hint:
    return (f"--config.{hint.group(2)}: no such setting; did you mean --config.{hint.group(1)}? "
            "(every setting is in configs/default.py)")
  if isinstance(error, (KeyError, AttributeError)) and key:
    return (f"--config.{key.group(1)}: no such setting (every setting is in "
            "configs/default.py)")
  return f"{text} (every setting is in configs/default.py)"


def _config_file_problem(error: BaseException) -> str | None:
  """`--config=FILE: line N: ...` for an error raised by the config file's own code."""
  if isinstance(error, SyntaxError) and error.filename and error.filename.endswith(".py"):
    where, line = error.filename, error.lineno
  else:
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if f.filename.endswith(".py") and "-packages" + os.sep not in f.filename
              and not f.filename.startswith(_PACKAGE_DIR)]
    if not frames:
      return None
    where, line = frames[-1].filename, frames[-1].lineno
  message = " ".join(str(error).split())
  return f"--config={where}: line {line}: {type(error).__name__}: {message}"


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with every mistake turned into a one-line UsageProblem.

  --help and friends print the usage and exit with status 0.
  """
  argv = list(argv)
  cli.exit_if_help(argv)
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    raise UsageProblem(str(e).split("\n")[0]) from e
  except Exception as e:  # pylint: disable=broad-except; loading runs the config file's code
    raise UsageProblem(_config_file_problem(e) or _override_problem(e)) from e
  config_flag = FLAGS["config"]
  if config_flag.value is None and not config_flag.present:
    raise UsageProblem("--config is required, e.g. --config=configs/digits.py (every setting "
                       "is in configs/default.py)")
  path = config_flags.get_config_filename(config_flag)
  if not os.path.isfile(path.split(":", 1)[0]):
    raise UsageProblem(_config_path_problem(path))
  try:
    # Loads the file and applies the overrides; a failure is kept until the config is used.
    FLAGS.config.get("loss")
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    raise UsageProblem(_override_problem(e)) from e
  except (OSError, SyntaxError) as e:
    first = " ".join(str(e).split())
    raise UsageProblem(f"--config={path} cannot be loaded: {first}") from e
  if not FLAGS.workdir:
    raise UsageProblem("--workdir is required: the folder of the run's checkpoints and "
                       "TensorBoard logs, e.g. --workdir=/tmp/hn_run")
  if len(rest) > 1:
    raise UsageProblem(f"unexpected arguments: {' '.join(rest[1:])} (settings are given as "
                       "--config.NAME=VALUE)")
  return rest


def _flags_parser(argv: Sequence[str]) -> list[str]:
  try:
    return parse_flags(argv)
  except UsageProblem as e:
    sys.exit(f"{PROG}: error: {e}")


class _OnlyOurs(py_logging.Filter):
  """Lets through warnings and errors, and INFO lines of hn_jax itself."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return (record.levelno >= py_logging.WARNING
            or os.path.abspath(record.pathname).startswith(_PACKAGE_DIR))


def quiet_libraries() -> None:
  """Hides the INFO chatter of libraries (Orbax, JAX, TensorFlow) unless --verbosity is given."""
  if FLAGS["verbosity"].present:
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  logging.get_absl_handler().addFilter(_OnlyOurs())


def _cluster_detected() -> bool:
  slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ
  tpu_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return slurm or tpu_pod


def initialize_distributed() -> None:
  """Joins the other processes of a multi-host run, if this is one."""
  import jax  # pylint: disable=g-import-not-at-top
  wanted = FLAGS.distributed == "yes" or (
      FLAGS.distributed == "auto" and (FLAGS.coordinator_address or _cluster_detected()))
  if not wanted:
    return
  # Cross-process collectives for CPU devices (tests, CPU clusters); GPUs and TPUs have their own.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                             num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  logging.info("Process %d of %d; %d local and %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def main(argv):
  del argv  # checked by parse_flags
  quiet_libraries()
  from hn_jax import run_config  # pylint: disable=g-import-not-at-top
  try:
    run_config.check(FLAGS.config, FLAGS.workdir)  # at once, before the heavy imports
  except run_config.ConfigMismatch as e:
    sys.exit(f"{PROG}: error: {e}")
  # TensorFlow only feeds data: keep it off the accelerators JAX uses.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  initialize_distributed()
  from hn_jax import datasets, run_config, train  # pylint: disable=g-import-not-at-top
  try:
    train.check_config(FLAGS.config)
    logging.debug("Config:\n%s", FLAGS.config)
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (train.ConfigError, train.TrainingStopped, datasets.DataNotPreparedError,
          run_config.ConfigMismatch) as e:
    sys.exit(f"{PROG}: error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=_flags_parser)
