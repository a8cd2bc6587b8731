"""Faults that must lose nothing and resume from nothing damaged (issue 22), each one real:
bytes flipped and files cut inside a real checkpoint, a full disk (an injected ENOSPC, and a
3 MB filesystem where the machine lets us mount one), two real processes on one workdir, a
real SIGINT."""

import errno
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hn_jax import checkpoints as checkpoints_lib
from hn_jax import errors, run_lock, sharding, train, train_step
from hn_jax.testing.runs import own_lines, signal_at_step, tiny_config
from hn_jax.tools import report

REPO = Path(__file__).resolve().parents[1]
# The command-line runs compile tiny_config's programs (hn_jax.testing.runs) (2 epochs of 14 steps, checkpoints at
# steps 14 and 28): the persistent compilation cache has them.
SAME_PROGRAMS = ["--config.image_size=16", "--config.embedding_dim=16",
                 "--config.lr_drop_epochs=(2,)"]


@pytest.fixture(scope="module")
def finished_run(tiny_run):
  """tiny_config()'s run (tests/conftest.py: trained once per session, shared: copy it)."""
  return tiny_run


def _copy(run: Path, tmp_path: Path) -> Path:
  workdir = tmp_path / "run"
  shutil.copytree(run, workdir)
  (workdir / run_lock.LOCK_FILE).unlink(missing_ok=True)
  return workdir


def _largest_array_file(step_dir: Path) -> Path:
  files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and "/d/" in str(f)]
  return max(files, key=lambda f: f.stat().st_size)


def _flip_bytes(step_dir: Path) -> None:  # 64 bytes in the middle of the largest array file
  target = _largest_array_file(step_dir)
  data = bytearray(target.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 64] = bytes(b ^ 0x5A for b in data[middle:middle + 64])
  target.write_bytes(bytes(data))


def _set_ff(step_dir: Path) -> None:  # 8 bytes set to 0xff
  target = _largest_array_file(step_dir)
  data = bytearray(target.read_bytes())
  data[len(data) // 3:len(data) // 3 + 8] = b"\xff" * 8
  target.write_bytes(bytes(data))


def _truncate(step_dir: Path) -> None:
  target = _largest_array_file(step_dir)
  target.write_bytes(target.read_bytes()[:target.stat().st_size // 2])


def _garbage_metadata(step_dir: Path) -> None:
  (step_dir / "state" / "_METADATA").write_bytes(os.urandom(512))


def _empty_progress(step_dir: Path) -> None:
  for f in (step_dir / "progress").iterdir():
    if f.is_file() and f.name != "_CHECKPOINT_METADATA":
      f.write_bytes(b"")


DAMAGE = {"flipped bytes": _flip_bytes, "0xff bytes": _set_ff, "truncated file": _truncate,
          "garbage _METADATA": _garbage_metadata, "empty progress file": _empty_progress}


@functools.lru_cache(maxsize=1)
def _like():
  """The run's state as restores need it (shapes and placement; a restore returns new arrays)."""
  _, state, _ = train_step.init_state(tiny_config(), steps_per_epoch=14, read_weights=False)
  return sharding.replicate(state, sharding.create_mesh())


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_moved_aside_and_the_previous_one_used(
    damage, finished_run, tmp_path):
  workdir = _copy(finished_run[0], tmp_path)
  DAMAGE[damage](workdir / "checkpoints" / "28")
  lines = []
  manager = checkpoints_lib.manager(workdir, create=False)
  step, _, progress = checkpoints_lib.restore_newest_good(
      manager, _like(), say=lambda fmt, *args: lines.append(fmt % args))
  manager.close()
  assert step == 14 and progress["count"] == 0
  assert len(lines) == 1 and lines[0].startswith("The checkpoint of step 28 is damaged: "), lines
  assert "\n" not in lines[0] and "moved to" in lines[0]
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["14"]
  assert (workdir / checkpoints_lib.DAMAGED_FOLDER / "28").is_dir(), "moved, not deleted"


def test_no_good_checkpoint_says_what_to_do(finished_run, tmp_path):
  workdir = _copy(finished_run[0], tmp_path)
  for step in ("14", "28"):
    _flip_bytes(workdir / "checkpoints" / step)
  manager = checkpoints_lib.manager(workdir, create=False)
  with pytest.raises(errors.NoGoodCheckpoint, match="none of the 2 checkpoints .* is good "
                     r"\(steps 28, 14, moved to .*\); start the run again in a new workdir"):
    checkpoints_lib.restore_newest_good(manager, _like(), say=lambda *a: None)
  manager.close()


@pytest.mark.slow
def test_a_complete_run_whose_final_checkpoint_is_damaged_trains_its_last_epoch_again(
    finished_run, tmp_path, caplog):
  run, uninterrupted = finished_run
  workdir = _copy(run, tmp_path)
  _flip_bytes(workdir / "checkpoints" / "28")
  caplog.set_level(logging.INFO, logger="absl")
  resumed = train.train_and_evaluate(tiny_config(), str(workdir))
  assert resumed == uninterrupted, "the same final metrics as the run never damaged"
  console = own_lines(caplog.records)
  assert any("The checkpoint of step 28 is damaged: 1 of" in line for line in console), console
  assert "Resumed" in "\n".join(console) and "step 14" in "\n".join(console)
  assert not any("complete run" in line for line in console)


def test_readers_skip_a_damaged_checkpoint_without_moving_it(finished_run, tmp_path, caplog):
  workdir = _copy(finished_run[0], tmp_path)
  _garbage_metadata(workdir / "checkpoints" / "28")
  caplog.set_level(logging.WARNING, logger="absl")
  _, _, state, _ = checkpoints_lib.restore_run(str(workdir))
  assert int(sharding.local_value(state.step)) == 14
  assert (workdir / "checkpoints" / "28").is_dir(), "a reader leaves the workdir as it is"
  assert any("step 28 is damaged" in r.getMessage() for r in caplog.records)


def test_digest_names_the_changed_array():
  import jax.numpy as jnp
  state = {"a": jnp.zeros(3), "b": jnp.ones((2, 2))}
  progress = {"sums": {}, "count": 0, "digest": checkpoints_lib.digest(state)}
  assert checkpoints_lib.verify(state, progress) is None
  changed = {"a": jnp.zeros(3), "b": jnp.ones((2, 2)).at[1, 1].set(1.0 + 2**-23)}
  assert checkpoints_lib.verify(changed, progress) == (
      "1 of 2 arrays differ from the digest saved with them (first: ['b'])")
  assert checkpoints_lib.verify(state, {"count": 0}) is not None


# A full disk.


@pytest.mark.slow
def test_too_little_free_space_stops_before_the_save(tmp_path, monkeypatch):
  free = {"bytes": 1 << 40}
  monkeypatch.setattr(checkpoints_lib, "_free_bytes", lambda folder: free["bytes"])
  evaluate = train.evaluators.RetrievalEvaluator.run

  def evaluate_then_fill_the_disk(self, *args, **kwargs):
    metrics = evaluate(self, *args, **kwargs)
    if kwargs.get("epoch") == 1:
      free["bytes"] = 1 << 20
    return metrics

  monkeypatch.setattr(train.evaluators.RetrievalEvaluator, "run", evaluate_then_fill_the_disk)
  with pytest.raises(errors.DiskFull) as error:
    train.train_and_evaluate(tiny_config(), str(tmp_path))
  message = str(error.value)
  assert message.startswith(f"no room for a checkpoint in {tmp_path / 'checkpoints'}: it needs "
                            "about ")
  assert "1.0 MB free; the checkpoint of step 0 is intact" in message
  assert "run the same command to resume" in message and "\n" not in message
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["0"]
  steps = [p[0] for p in report.load_scalars(tmp_path)["step_loss"]]
  assert max(steps) == 14, "nothing trained past the save that could not happen"


@pytest.mark.slow
def test_a_save_failing_in_the_background_stops_the_run_at_the_next_step(tmp_path, monkeypatch):
  monkeypatch.setattr(checkpoints_lib, "_free_bytes", lambda folder: None)  # as on gs://
  saved, real_save = [], checkpoints_lib.Saver.save
  real_check = checkpoints_lib.ocp.CheckpointManager.check_for_errors

  def save(self, step, state, progress):
    real_save(self, step, state, progress)
    saved.append(step)

  def check_for_errors(self):  # what Orbax raises when its thread hit a full disk
    if 14 in saved:
      raise ValueError('RESOURCE_EXHAUSTED: Error writing "params.x/0" in OCDBT database: '
                       "Failed to write 6 bytes: No space left on device [os_error_code='28']")
    real_check(self)

  monkeypatch.setattr(checkpoints_lib.Saver, "save", save)
  monkeypatch.setattr(checkpoints_lib.ocp.CheckpointManager, "check_for_errors",
                      check_for_errors)
  with pytest.raises(errors.DiskFull, match="no room for a checkpoint in .*: it needs about "
                     r".*, the disk is full; the checkpoint of step (0|14) is intact"):
    train.train_and_evaluate(tiny_config(), str(tmp_path))
  steps = [p[0] for p in report.load_scalars(tmp_path)["step_loss"]]
  assert max(steps) == 14, "the run stops at the first step after the failed save"


def test_enospc_is_recognised_through_wrapping_errors():
  inner = OSError(errno.ENOSPC, "No space left on device")
  try:
    try:
      raise inner
    except OSError as e:
      raise RuntimeError("commit failed") from e
  except RuntimeError as outer:
    assert checkpoints_lib.is_out_of_space(outer)
  assert not checkpoints_lib.is_out_of_space(ValueError("shape mismatch"))


def _tiny_filesystem(path: Path) -> bool:
  path.mkdir()
  if not shutil.which("mount") or os.geteuid() != 0:
    return False
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(path)],
                        capture_output=True, check=False)
  return done.returncode == 0


@pytest.mark.slow
def test_a_real_full_disk_through_the_command(tmp_path):
  """The command on a 3 MB filesystem: one line, exit 1, the checkpoints before intact."""
  mount = tmp_path / "small"
  if not _tiny_filesystem(mount):
    pytest.skip("cannot mount a 3 MB tmpfs here (needs root); the injected cases cover it")
  try:
    result = subprocess.run(
        [sys.executable, "-m", "hn_jax.main", f"--config={REPO / 'configs/digits.py'}",
         f"--workdir={mount / 'run'}", "--config.num_epochs=4", "--config.eval_every=1",
         *SAME_PROGRAMS],
        cwd=tmp_path, capture_output=True, text=True, timeout=400, check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    problems = [line for line in result.stderr.splitlines() if not line.startswith("I")]
    assert len(problems) == 1 and problems[0].startswith("hn_jax: error: no room for a "
                                                         "checkpoint in "), result.stderr[-3000:]
    assert result.stdout == ""
    good = checkpoints_lib.finished_steps(mount / "run" / "checkpoints")
    assert good and f"the checkpoint of step {good[-1]} is intact" in problems[0]
  finally:
    subprocess.run(["umount", str(mount)], check=False)


# One run per workdir.


HOLDER = textwrap.dedent("""
    import sys, time
    from hn_jax import run_lock
    with run_lock.WorkdirLock(sys.argv[1], lease=sys.argv[2] == "lease", lease_seconds=2.0):
      print("holding", flush=True)
      time.sleep(600)
""")


def _holder(workdir: Path, mode: str) -> subprocess.Popen:
  process = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir), mode],
                             stdout=subprocess.PIPE, text=True, cwd=REPO)
  assert process.stdout.readline().strip() == "holding"
  return process


@pytest.mark.parametrize("mode", ["flock", "lease"])
def test_a_busy_workdir_is_refused_until_its_holder_dies(tmp_path, mode):
  holder = _holder(tmp_path, mode)
  try:
    with pytest.raises(errors.WorkdirBusy) as busy:
      with run_lock.WorkdirLock(tmp_path, lease=mode == "lease", lease_seconds=2.0):
        pass
    assert f"pid {holder.pid} on " in str(busy.value) and "since 20" in str(busy.value)
    assert "another --workdir" in str(busy.value) and "\n" not in str(busy.value)
  finally:
    holder.send_signal(signal.SIGKILL)  # no release: the OS (or the lease's expiry) frees it
    holder.wait()
  if mode == "lease":
    time.sleep(2.1)
  with run_lock.WorkdirLock(tmp_path, lease=mode == "lease", lease_seconds=2.0):
    pass


def test_a_live_lease_is_renewed(tmp_path):
  with run_lock.WorkdirLock(tmp_path, lease=True, lease_seconds=0.8):
    first = json.loads((tmp_path / run_lock.LEASE_FILE).read_text())["heartbeat"]
    time.sleep(0.9)
    assert json.loads((tmp_path / run_lock.LEASE_FILE).read_text())["heartbeat"] > first
    with pytest.raises(errors.WorkdirBusy):
      run_lock.WorkdirLock(tmp_path, lease=True, lease_seconds=0.8).__enter__()
  assert not (tmp_path / run_lock.LEASE_FILE).exists(), "released on exit"


@pytest.mark.slow
def test_a_second_run_on_a_busy_workdir_is_refused_in_one_line(tmp_path):
  workdir = tmp_path / "run"
  holder = _holder(workdir, "flock")
  try:
    result = subprocess.run(
        [sys.executable, "-m", "hn_jax.main", f"--config={REPO / 'configs/digits.py'}",
         f"--workdir={workdir}"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        check=False)
  finally:
    holder.kill()
    holder.wait()
  assert result.returncode == 1
  lines = [line for line in result.stderr.splitlines() if not line.startswith("I")]
  assert lines == [lines[0]] and lines[0].startswith(f"hn_jax: error: {workdir} is in use by "
                                                     f"another run (pid {holder.pid} on ")
  assert sorted(p.name for p in workdir.iterdir()) == [run_lock.LOCK_FILE], "nothing written"


# Ctrl-C.


@pytest.mark.slow
def test_ctrl_c_checkpoints_at_the_next_step_and_a_second_one_stops_at_once(
    finished_run, tmp_path, monkeypatch):
  signal_at_step(monkeypatch, 5, signal.SIGINT)
  with pytest.raises(errors.Interrupted, match="Ctrl-C: saved the checkpoint of step 5; run "
                     "the same command to resume"):
    train.train_and_evaluate(tiny_config(), str(tmp_path / "once"))
  assert (tmp_path / "once" / "checkpoints" / "5").is_dir()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "handler removed"
  monkeypatch.undo()
  resumed = train.train_and_evaluate(tiny_config(), str(tmp_path / "once"))
  assert resumed == finished_run[1], "resumed from the Ctrl-C's checkpoint, exactly"
  signal_at_step(monkeypatch, 3, signal.SIGINT, times=2)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(tiny_config(), str(tmp_path / "twice"))
  assert sorted(p.name for p in (tmp_path / "twice" / "checkpoints").iterdir()) == ["0"]


@pytest.mark.slow
def test_ctrl_c_through_the_command_exits_130(tmp_path):
  workdir = tmp_path / "run"
  command = [sys.executable, "-m", "hn_jax.main", f"--config={REPO / 'configs/digits.py'}",
             f"--workdir={workdir}", "--config.num_epochs=40", "--config.eval_every=40",
             *SAME_PROGRAMS]
  process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  lines = []
  for line in process.stderr:
    lines.append(line)
    if "Step 1 done" in line:
      break
  process.send_signal(signal.SIGINT)
  out, err = process.communicate(timeout=120)
  lines += err.splitlines()
  assert process.returncode == 130, "".join(lines)[-3000:]
  problems = [line for line in lines if not line.startswith(("I", "W"))]
  assert len(problems) == 1 and problems[0].startswith("hn_jax: Ctrl-C: saved the checkpoint "
                                                       "of step "), problems
  assert out == "" and "Traceback" not in "".join(lines)
  step = int(problems[0].split("step ")[1].split(";")[0])
  assert checkpoints_lib.finished_steps(workdir / "checkpoints")[-1] == step
  # (That a run resumes exactly from a Ctrl-C's checkpoint: the in-process test above.)


# Bad files given to the commands: one line each, before anything heavy.


def _write_bad_indexes(folder: Path) -> dict:
  import numpy as np
  np.savez(folder / "foreign.npz", a=np.zeros(3))
  np.savez(folder / "pickled.npz", a=np.array([{"x": 1}], dtype=object))
  (folder / "random.npz").write_bytes(os.urandom(100))
  whole = (folder / "foreign.npz").read_bytes()
  (folder / "truncated.npz").write_bytes(whole[:len(whole) // 2])
  return {"foreign.npz": "not an index of hn_jax.tools.embed (no embeddings, labels, "
                         "embedding_dim)",
          "pickled.npz": "holds pickled objects", "random.npz": "not a zip archive",
          "truncated.npz": "not a readable .npz index (BadZipFile"}


def test_a_bad_index_is_one_line(tmp_path, capsys):
  from hn_jax.tools import search
  for name, words in _write_bad_indexes(tmp_path).items():
    assert search.main([f"--index={tmp_path / name}", "--query_split=test"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"hn_jax.tools.search: error: --index={tmp_path / name}: ")
    assert words in err and "\n" not in err, err


# Advice and rules agree.


@pytest.mark.parametrize("key", ["learning_rate", "momentum", "temperature"])
def test_non_finite_settings_are_refused_up_front(key):
  from hn_jax import run_config
  for value in (float("inf"), float("nan")):
    with pytest.raises(run_config.ConfigError, match=f"config.{key}={value} must be a finite"):
      run_config.validate(tiny_config(**{key: value}), num_devices=8, num_processes=1)


@pytest.mark.slow
def test_a_run_stopped_by_non_finite_steps_resumes_with_the_lower_rate_it_is_told_to_use(
    tmp_path):
  # The default limit of non-finite steps (10 in a row, tests/test_train.py's stopped run: the
  # same programs); the lower rate is tiny_config's own (tiny_run's programs, from the cache).
  config = tiny_config(learning_rate=1e30)
  with pytest.raises(errors.TrainingStopped, match="lower config.learning_rate .* then resume"):
    train.train_and_evaluate(config, str(tmp_path))
  assert tiny_config().learning_rate == 0.05
  metrics = train.train_and_evaluate(tiny_config(learning_rate=0.05), str(tmp_path))
  assert 0 < metrics["DIGITS_test_R_1"] <= 1
  history = json.loads((tmp_path / "config_history.json").read_text())
  assert [h["changes"] for h in history] == [{"learning_rate": [1e30, 0.05]}]


@pytest.mark.slow
def test_a_bad_weights_file_is_one_line_naming_it(tmp_path):
  from hn_jax import run_config
  for name, words in _write_bad_indexes(tmp_path).items():
    config = tiny_config(model="resnet18", pretrained=str(tmp_path / name))
    with pytest.raises(run_config.ConfigError) as error:
      train_step.init_model(config)
    message = str(error.value)
    assert message.startswith(f"config.pretrained={tmp_path / name}: ") and "\n" not in message
    if name == "foreign.npz":
      assert "does not match the model (103 problem(s)); missing key" in message
      assert message.endswith("(100 more)")
    else:
      assert "not a readable .npz weights file" in message, message


@pytest.mark.slow
def test_a_full_disk_under_the_event_files_stops_the_run(tmp_path, monkeypatch):
  create = train._create_writer  # pylint: disable=protected-access

  def writer_on_a_full_disk(workdir):
    writer = create(workdir)

    def flush():
      raise OSError(errno.ENOSPC, "No space left on device")

    writer.flush = flush
    return writer

  monkeypatch.setattr(train, "_create_writer", writer_on_a_full_disk)
  with pytest.raises(errors.DiskFull, match=f"no room for the TensorBoard event files in "
                     f"{tmp_path} \\(the checkpoints are intact\\)"):
    train.train_and_evaluate(tiny_config(), str(tmp_path))
  assert checkpoints_lib.finished_steps(tmp_path / "checkpoints") == [0], "stopped at epoch 1"
