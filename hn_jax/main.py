"""Command line: `python -m hn_jax.main --config=configs/digits.py --workdir=DIR`.

Any config value can be overridden, e.g. `--config.loss=shn --config.seed=3`.

Several hosts: every process runs the same command. JAX's runtime connects them from
`--coordinator_address`, `--num_processes` and `--process_id`, or by itself on TPU pods
and under SLURM (`--distributed=auto` notices both); see `launch/`.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for TensorBoard logs and checkpoints.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.DEFINE_enum("distributed", "auto", ["auto", "yes", "no"],
                  "Initialize jax.distributed: `auto` does when a coordinator is given or a "
                  "multi-process SLURM job or TPU pod is detected.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host runs).")
flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")
flags.mark_flags_as_required(["config", "workdir"])


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
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # TensorFlow only feeds data: keep it off the accelerators JAX uses.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  initialize_distributed()
  from hn_jax import datasets, train  # pylint: disable=g-import-not-at-top
  logging.info("Config:\n%s", FLAGS.config)
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (train.ConfigError, train.TrainingStopped, datasets.DataNotPreparedError) as e:
    sys.exit(f"hn_jax: error: {e}")


if __name__ == "__main__":
  app.run(main)
