"""Scale-out: the same run on 1 device, 4 devices and 2 processes x 2 devices; preemption."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import digits
from hn_jax import sharding, train
from hn_jax.tools import report

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config=configs/digits.py", "--config.image_size=16", "--config.embedding_dim=16",
        "--config.batch_size=128", "--config.eval_batch_size=256", "--config.learning_rate=0.001"]


def _env(devices):
  return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _finish(proc, timeout=400):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-3000:]
  return out


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _tiny_config():
  config = digits.get_config()
  for arg in TINY[1:]:
    key, value = arg.removeprefix("--config.").split("=")
    config[key] = type(config[key])(value)
  config.num_epochs = 1
  return config


@pytest.fixture(scope="module")
def topologies(tmp_path_factory):
  """1 process x 1 device and 1 x 4 in this process; 2 processes x 2 devices launched."""
  root = tmp_path_factory.mktemp("topologies")
  two = subprocess.Popen(
      ["bash", "launch/local_multiprocess.sh", "2", "2", "--", *TINY, "--config.num_epochs=1",
       f"--workdir={root / 'two_processes'}"],
      cwd=REPO, env=dict(_env(2), PORT=str(_free_port()), PYTHON=sys.executable),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for name, count in (("one_device", 1), ("four_devices", 4)):
    train.train_and_evaluate(_tiny_config(), str(root / name),
                             mesh=sharding.create_mesh(jax.devices()[:count]))
  _finish(two)
  return {name: report.load_scalars(root / name)
          for name in ("one_device", "four_devices", "two_processes")}


@pytest.mark.parametrize("other", ["four_devices", "two_processes"])
def test_same_losses_and_recalls_on_every_topology(topologies, other):
  base, run = topologies["one_device"], topologies[other]
  base_loss = np.array([p[2] for p in base["step_loss"]])
  run_loss = np.array([p[2] for p in run["step_loss"]])
  assert len(base_loss) == len(run_loss) == 920 // 128
  np.testing.assert_allclose(run_loss, base_loss, rtol=1e-5, atol=1e-6)
  for key in ("DIGITS_test_R_1", "DIGITS_test_R_8", "DIGITS_train_R_1"):
    assert abs(run[key][-1][2] - base[key][-1][2]) <= 1e-5, key


@pytest.mark.parametrize("script", ["launch/local_multiprocess.sh", "launch/slurm_gpu.sbatch",
                                    "launch/tpu_pod.sh", "launch/sweep.sh",
                                    "benchmarks/device_check.sh"])
def test_launch_scripts_parse_and_pass_shellcheck(script):
  path = REPO / script
  subprocess.run(["bash", "-n", str(path)], check=True)
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed")
  result = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout
