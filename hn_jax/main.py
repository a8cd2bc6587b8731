"""Trains an embedding: `python -m hn_jax.main --config=configs/digits.py --workdir=DIR`.

Every setting, with its default and a one-line comment, is listed in docs/settings.md
(generated from `hn_jax.run_config.defaults()`, where they are defined); the dataset configs
(configs/digits.py, cub.py, car.py, sop.py, inshop.py, hotel.py, synthetic.py) change what
differs. Override any of them on the command line, e.g. `--config.loss=shn --config.seed=3
--config.num_epochs=40`; a loss's own hyperparameters as `--config.loss_params.KEY=VALUE`
(docs/losses.md). What the settings reproduce is described in docs/protocol.md; the
datasets' layouts in docs/datasets.md.

The workdir belongs to one run: running the same command again resumes it; settings that
shape the run cannot change then (see hn_jax/run_config.py). Asked again once finished, it
prints the run's final evaluation at once. Compiled programs are kept in ~/.cache/hn_jax/xla
(`--xla_cache`), so the next run of the same model and batch skips compiling.

The console shows progress, one line per epoch and per evaluation, and a summary; per-step
scalars go to TensorBoard (`tensorboard --logdir=DIR`). Libraries' INFO logs are hidden
unless --verbosity is given (e.g. --verbosity=0 shows them, --verbosity=1 adds debug).

Several hosts: every process runs the same command. JAX's runtime connects them from
`--coordinator_address`, `--num_processes` and `--process_id`, or by itself on TPU pods
and under SLURM (`--distributed=auto` notices both); see `launch/`.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import flags, logging

from hn_jax import cli

PROG = "hn_jax"  # in its messages, `hn_jax: error: ...`
MODULE = "hn_jax.main"
FLAGS = cli.command_flags()
flags.DEFINE_string("workdir", None, "Directory for TensorBoard logs and checkpoints "
                    "(one run per directory; the same command resumes it), e.g. "
                    "--workdir=/tmp/hn_run", flag_values=FLAGS)
cli.define_config(FLAGS, help_text="Training configuration file, e.g. configs/digits.py; "
                  "every setting is documented in docs/settings.md.")
flags.DEFINE_enum("distributed", "auto", ["auto", "yes", "no"],
                  "Initialize jax.distributed: `auto` does when a coordinator is given or a "
                  "multi-process SLURM job or TPU pod is detected.", flag_values=FLAGS)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host runs).",
                    flag_values=FLAGS)
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host runs).",
                     flag_values=FLAGS)
flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.",
                     flag_values=FLAGS)


def _cluster_detected() -> bool:
  slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ
  tpu_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return slurm or tpu_pod


def _distributed() -> bool:
  """Whether this process is one of a multi-host run."""
  return FLAGS.distributed == "yes" or bool(
      FLAGS.distributed == "auto" and (FLAGS.coordinator_address or _cluster_detected()))


def initialize_distributed() -> None:
  """Joins the other processes of a multi-host run, if this is one."""
  if not _distributed():
    return
  import jax  # pylint: disable=g-import-not-at-top
  # Cross-process collectives for CPU devices (tests, CPU clusters); GPUs and TPUs have their own.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                             num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  logging.info("Process %d of %d; %d local and %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def _train(_: list[str]) -> None:
  config, workdir = FLAGS.config, FLAGS.workdir
  from hn_jax import run_config  # pylint: disable=g-import-not-at-top
  changes = run_config.check(config, workdir)  # at once, before the heavy imports
  if not _distributed():
    from hn_jax import finished  # pylint: disable=g-import-not-at-top
    line = finished.answer(config, workdir)  # a finished run asked again: its result, at once
    if line:
      print(line, flush=True)
      return
  initialize_distributed()
  import jax  # pylint: disable=g-import-not-at-top
  run_config.validate(config, num_devices=jax.device_count(), num_processes=jax.process_count())
  logging.debug("Config:\n%s", config)
  # TensorFlow only feeds data: keep it off the accelerators JAX uses.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  from hn_jax import train  # pylint: disable=g-import-not-at-top
  train.train_and_evaluate(config, workdir, changes=changes,
                           summary=lambda line: print(line, flush=True))  # the result: stdout


def main(argv: Sequence[str] | None = None) -> int:
  """The command line (without the program name); returns the exit status."""
  from hn_jax import run_config  # pylint: disable=g-import-not-at-top
  from hn_jax.data import datasets  # pylint: disable=g-import-not-at-top
  return cli.run(_train, FLAGS, argv, prog=PROG, module=MODULE, doc=__doc__,
                 required=("workdir",),
                 errors=(run_config.ConfigError, run_config.ConfigMismatch,
                         datasets.DataNotPreparedError))


if __name__ == "__main__":
  sys.exit(main())
