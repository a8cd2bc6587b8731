"""What the training tests share: the tiny digits run's config and a real signal at a step.

`tiny_config` is the run of tests/test_train.py and tests/test_faults.py (and of
benchmarks/train_loop.py --smoke): 2 epochs of 14 steps on the embedded digits at 16 px, so
every test that trains it reuses the same compiled programs (JAX's persistent compilation
cache, see tests/conftest.py); tests/conftest.py's `tiny_run` trains it once per session.
"""

from __future__ import annotations

import os

# The same settings as command-line overrides of configs/digits.py (for the tests that run
# `python -m hn_jax.main`: with these, the programs are tiny_config's, from the cache).
TINY_OVERRIDES = dict(image_size=16, embedding_dim=16, batch_size=64, eval_batch_size=512,
                      num_epochs=2, eval_every=1, lr_drop_epochs=(2,))


def own_lines(records) -> list[str]:
  """The messages of `records` (pytest's caplog.records) that hn_jax itself logged: the run's
  console account, without the libraries' lines."""
  from hn_jax import cli  # pylint: disable=import-outside-toplevel
  return [r.getMessage() for r in records if cli.logged_by_hn_jax(r)]


def tiny_config(**overrides):
  """configs/digits.py at TINY_OVERRIDES, then `overrides` (needs the checkout's configs/)."""
  from configs import digits  # pylint: disable=import-outside-toplevel
  config = digits.get_config()
  config.update(TINY_OVERRIDES)
  config.update(overrides)
  return config


def signal_at_step(monkeypatch, step: int, signum: int, times: int = 1) -> None:
  """Makes training send `signum` to this process `times` times right after the loop logs
  step `step` (a real signal, mid-epoch, as from Ctrl-C or a scheduler's SIGTERM), by wrapping
  hn_jax.train.EpochLog.add through `monkeypatch` (`monkeypatch.undo()` ends it)."""
  from hn_jax import train  # pylint: disable=import-outside-toplevel
  add = train.EpochLog.add

  def add_then_signal(self, logged_step, metrics):
    add(self, logged_step, metrics)
    if logged_step == step:
      for _ in range(times):
        os.kill(os.getpid(), signum)

  monkeypatch.setattr(train.EpochLog, "add", add_then_signal)
