"""Faults that must lose nothing, use nothing foreign or damaged without a line, and hang
nowhere (issue 32), each made real where it can be: real files, a file where a folder should
be, chmod where the tests do not run as root, a checkpoint folder replaced mid-run; a full
disk and running out of memory are injected at the layer that meets them (an OSError ENOSPC,
a MemoryError, XLA's RESOURCE_EXHAUSTED) where a real one is impossible here."""

import errno
import io
import json
import logging
import os
import shutil
import stat
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hn_jax import checkpoints as checkpoints_lib
from hn_jax import compile_cache, errors, output_files, run_config, run_lock
from hn_jax.testing.runs import tiny_config

ROOT_IGNORES_PERMISSIONS = hasattr(os, "geteuid") and os.geteuid() == 0


def _copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
  workdir = tmp_path / name
  shutil.copytree(run, workdir)
  (workdir / run_lock.LOCK_FILE).unlink(missing_ok=True)
  return workdir


def _one_line(text: str) -> str:
  text = str(text)
  assert "\n" not in text.strip(), text
  return text


# Settings ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("key,value", [
    ("checkpoints_to_keep", 0), ("checkpoints_to_keep", -1), ("seed", -1), ("seed", 2**63),
    ("max_consecutive_skips", 0), ("synthetic_classes", 40000)])
def test_settings_that_cannot_work_are_one_line(key, value):
  config = tiny_config(**{key: value}, **({"dataset": "synthetic"}
                                          if key == "synthetic_classes" else {}))
  with pytest.raises(run_config.ConfigError, match=f"config.{key}=") as e:
    run_config.validate(config, num_devices=8, num_processes=1)
  _one_line(e.value)


def test_checkpoints_to_keep_0_on_resume_deletes_nothing(tiny_run, tmp_path, capsys):
  from hn_jax import main  # pylint: disable=import-outside-toplevel
  workdir = _copy(tiny_run[0], tmp_path)
  before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  overrides = [f"--config.{k}={v}" for k, v in
               dict(image_size=16, embedding_dim=16, batch_size=64, eval_batch_size=512,
                    num_epochs=3, eval_every=1, lr_drop_epochs="(2,)").items()]
  status = main.main(["--config=configs/digits.py", f"--workdir={workdir}", *overrides,
                      "--config.checkpoints_to_keep=0"])
  err = capsys.readouterr().err.strip()
  assert status == 2 and "config.checkpoints_to_keep=0 must be at least 1" in err
  _one_line(err)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before == ["14", "28"]


# A run's settings live with its checkpoints ------------------------------------------------------


@pytest.mark.parametrize("damage", ["missing", "empty", "not json", "a list"])
def test_lost_or_broken_config_json_is_read_from_the_checkpoints(damage, tiny_run, tmp_path,
                                                                  caplog):
  workdir = _copy(tiny_run[0], tmp_path)
  original = json.loads((workdir / "config.json").read_text())
  path = workdir / "config.json"
  {"missing": path.unlink, "empty": lambda: path.write_text(""),
   "not json": lambda: path.write_text("{\"loss\": "),
   "a list": lambda: path.write_text("[]")}[damage]()
  with caplog.at_level(logging.WARNING):
    assert run_config.load(str(workdir)) == original
  said = [r.getMessage() for r in caplog.records if "saved with the checkpoint" in r.getMessage()]
  assert len(said) == 1 and "step 28" in said[0], said
  # Other settings are refused as with config.json present; the step count is the run's.
  for other in (dict(embedding_dim=32), dict(batch_size=32), dict(loss="hn")):
    with pytest.raises(run_config.ConfigMismatch) as e:
      run_config.check(tiny_config(**other), str(workdir))
    assert f"config.{next(iter(other))}=" in _one_line(e.value)
  assert run_config.check(tiny_config(num_epochs=5), str(workdir)) == {"num_epochs": (2, 5)}


def test_broken_config_json_without_checkpoints_is_one_line(tmp_path):
  (tmp_path / "config.json").write_text("{oops")
  with pytest.raises(run_config.ConfigError, match="is not valid JSON .* delete it") as e:
    run_config.load(str(tmp_path))
  _one_line(e.value)


def test_broken_config_history_is_one_line_before_anything_is_written(tiny_run, tmp_path):
  workdir = _copy(tiny_run[0], tmp_path)
  (workdir / "config_history.json").write_text("not json")
  config_before = (workdir / "config.json").read_text()
  with pytest.raises(run_config.ConfigError, match="config_history.json is not a readable") as e:
    run_config.check(tiny_config(num_epochs=4), str(workdir))
  _one_line(e.value)
  assert (workdir / "config.json").read_text() == config_before


@pytest.mark.slow
def test_a_resume_writes_a_lost_config_json_back(tiny_run, tmp_path):
  from hn_jax import train  # pylint: disable=import-outside-toplevel
  workdir = _copy(tiny_run[0], tmp_path)
  original = json.loads((workdir / "config.json").read_text())
  (workdir / "config.json").unlink()
  assert train.train_and_evaluate(tiny_config(), str(workdir)) == {}  # complete: nothing to do
  assert json.loads((workdir / "config.json").read_text()) == original


# A restore of other settings is not damage -------------------------------------------------------


@pytest.mark.parametrize("with_config", [True, False])
def test_checkpoint_of_other_settings_is_refused_and_moved_nowhere(with_config, tiny_run,
                                                                   tmp_path):
  from hn_jax import sharding, train_step  # pylint: disable=import-outside-toplevel
  workdir = _copy(tiny_run[0], tmp_path)
  (workdir / "config.json").unlink()
  config = tiny_config(embedding_dim=32)
  _, state, _ = train_step.init_state(config, steps_per_epoch=14, read_weights=False)
  state = sharding.replicate(state, sharding.create_mesh())
  manager = checkpoints_lib.manager(workdir, create=False)
  with pytest.raises(errors.CheckpointMismatch) as e:
    checkpoints_lib.restore_newest_good(manager, state, say=lambda *a: None,
                                        config=config if with_config else None)
  manager.close()
  message = _one_line(e.value)
  assert "the checkpoint of step 28" in message and "config.embedding_dim" in message
  if with_config:
    assert "config.embedding_dim=32 but the checkpoint's is 16" in message
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["14", "28"]
  assert not (workdir / checkpoints_lib.DAMAGED_FOLDER).exists()


# A save that fails in the background -------------------------------------------------------------


@pytest.mark.slow
def test_failed_background_save_stops_at_the_next_step_and_lets_go(tmp_path, monkeypatch):
  from hn_jax import train  # pylint: disable=import-outside-toplevel
  from orbax.checkpoint._src.futures import future  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "run"
  logged = []
  add = train.EpochLog.add

  def add_then_break(self, step, metrics):  # the checkpoint folder becomes a file at step 5
    add(self, step, metrics)
    logged.append(step)
    if step == 5:
      shutil.rmtree(workdir / "checkpoints")
      (workdir / "checkpoints").write_text("")

  monkeypatch.setattr(train.EpochLog, "add", add_then_break)
  with pytest.raises(errors.RunStopped, match="saving a checkpoint in .* failed") as e:
    train.train_and_evaluate(tiny_config(), str(workdir))
  _one_line(e.value)
  assert 14 <= logged[-1] < 20, logged  # the save of step 14 failed: stopped soon after, not at 28
  stuck = [t for t in threading.enumerate()
           if isinstance(t, future._SignalingThread) and t.is_alive()]  # pylint: disable=protected-access
  assert not stuck, "threads left that would keep the process from exiting"
  with run_lock.WorkdirLock(workdir):  # the lock was let go
    pass


# Workdirs that cannot be written -----------------------------------------------------------------


def test_workdir_that_is_a_file_or_too_long_is_one_line(tmp_path):
  a_file = tmp_path / "file"
  a_file.write_text("x")
  with pytest.raises(errors.WorkdirUnusable, match="a file stands where a folder should be"):
    with run_lock.WorkdirLock(a_file / "run"):
      pass
  long_name = tmp_path / ("x" * 300)
  with pytest.raises(errors.WorkdirUnusable, match="use a shorter path") as e:
    with run_lock.WorkdirLock(long_name):
      pass
  _one_line(e.value)
  assert run_config.load(str(long_name)) is None  # no traceback reading it either


def test_read_only_workdir_is_one_line(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  workdir.mkdir()
  if ROOT_IGNORES_PERMISSIONS:  # root writes anyway: the refusal the kernel would give
    real_open = os.open

    def read_only_open(path, flags, *args):
      if os.fspath(path).startswith(os.fspath(workdir)) and flags & os.O_CREAT:
        raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
      return real_open(path, flags, *args)
    monkeypatch.setattr(os, "open", read_only_open)
  else:
    workdir.chmod(0o555)
  try:
    with pytest.raises(errors.WorkdirUnusable, match="make it writable") as e:
      with run_lock.WorkdirLock(workdir):
        pass
    _one_line(e.value)
  finally:
    workdir.chmod(0o755)


def test_full_disk_at_start_is_one_line(tmp_path, monkeypatch):
  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(run_lock.os, "pwrite", full)
  with pytest.raises(errors.DiskFull, match="no room to write in") as e:
    with run_lock.WorkdirLock(tmp_path / "run"):
      pass
  _one_line(e.value)
  monkeypatch.undo()
  with run_lock.WorkdirLock(tmp_path / "run"):  # nothing held after the failure
    pass
  from etils import epath  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(epath.Path, "write_text", full)
  with pytest.raises(errors.DiskFull):
    run_config.record(tiny_config(), str(tmp_path / "run"))


def test_unreachable_remote_workdir_is_one_line(monkeypatch):
  from etils import epath  # pylint: disable=import-outside-toplevel
  remote = type(epath.Path("gs://bucket/run"))  # the class of gs:// paths (no network used)

  def no_network(self, *args, **kwargs):
    raise RuntimeError("Could not resolve host: storage.googleapis.com\nretrying...")
  for method in ("is_file", "exists", "mkdir", "iterdir", "read_text", "write_text"):
    monkeypatch.setattr(remote, method, no_network)
  with pytest.raises(run_config.ConfigError, match="cannot reach it .* check the network") as e:
    run_config.load("gs://bucket/run")
  _one_line(e.value)

  with pytest.raises(errors.WorkdirUnusable, match="cannot reach gs://bucket/run .* network") as e:
    with run_lock.WorkdirLock("gs://bucket/run"):
      pass
  _one_line(e.value)


# Out of memory -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_out_of_memory_in_the_step_names_the_batch_size(tmp_path, monkeypatch):
  from hn_jax import train, train_step  # pylint: disable=import-outside-toplevel
  make = train_step.make_train_step

  def make_failing(*args, **kwargs):
    make(*args, **kwargs)

    def step(*a):
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12.5GiB.")
    return step
  monkeypatch.setattr(train_step, "make_train_step", make_failing)
  with pytest.raises(errors.OutOfMemory, match="in the training step; lower --config.batch_size"
                     ) as e:
    train.train_and_evaluate(tiny_config(), str(tmp_path / "run"))
  _one_line(e.value)
  assert (tmp_path / "run" / "checkpoints" / "0").is_dir()  # what was saved stays


# The decoded-image cache -------------------------------------------------------------------------


def _split(n=6, name="toy-train"):
  from hn_jax.data import splits  # pylint: disable=import-outside-toplevel
  images = np.random.default_rng(0).integers(0, 256, (n, 20, 24, 3), np.uint8)
  return splits.Split(images, np.arange(n) % 3, None, name=name,
                      fingerprint=f"round3-{name}-{n}", cache_folder="")


def test_cache_folder_that_is_a_file_or_full_is_one_line(tmp_path, monkeypatch):
  from hn_jax.data import image_cache  # pylint: disable=import-outside-toplevel
  a_file = tmp_path / "cache"
  a_file.write_text("x")
  with pytest.raises(image_cache.CacheError, match="is a file; set --config.cache_dir") as e:
    image_cache.cached_images(_split(), "eval", 16, image_cache.CachePolicy("disk", str(a_file)))
  assert isinstance(e.value, errors.RunStopped)  # the commands print it in one line
  _one_line(e.value)
  monkeypatch.setattr(image_cache, "_free_bytes", lambda folder: 1000)
  with pytest.raises(image_cache.CacheError, match="has 0.00 GB free") as e:
    image_cache.cached_images(_split(name="b"), "eval", 16,
                              image_cache.CachePolicy("disk", str(tmp_path / "room")))
  _one_line(e.value)


def test_cache_out_of_memory_names_the_cache_setting(tmp_path, monkeypatch):
  from hn_jax.data import image_cache  # pylint: disable=import-outside-toplevel

  def no_memory(*args, **kwargs):
    raise MemoryError()
  monkeypatch.setattr(image_cache, "from_arrays", no_memory)
  with pytest.raises(image_cache.CacheError, match="out of memory .* --config.cache=disk") as e:
    image_cache.cached_images(_split(name="m"), "eval", 16, image_cache.CachePolicy("memory"))
  _one_line(e.value)
  assert image_cache.cached_images(_split(name="a"), "eval", 16,
                                   image_cache.CachePolicy("auto")) is None  # auto: uncached


def test_damaged_cache_in_a_read_only_folder_is_rebuilt_in_memory(tmp_path, monkeypatch):
  from hn_jax.data import image_cache  # pylint: disable=import-outside-toplevel
  folder = tmp_path / "cache"
  split = _split(name="ro")
  key = image_cache.CacheKey(split.identity, "eval", 16)
  path = folder / image_cache.file_name(split.name, key)
  image_cache.write_file(str(path), key, image_cache.transform_in_memory(split.images, "eval", 16),
                         len(split))
  data = bytearray(path.read_bytes())
  data[40] ^= 0xFF  # a flipped pixel byte: its CRC32 fails
  path.write_bytes(bytes(data))
  if ROOT_IGNORES_PERMISSIONS:
    real_remove = os.remove

    def refuse(p, *a, **k):
      if os.fspath(p).startswith(os.fspath(folder)):
        raise PermissionError(errno.EACCES, "Permission denied", os.fspath(p))
      return real_remove(p, *a, **k)
    monkeypatch.setattr(os, "remove", refuse)
    monkeypatch.setattr(image_cache, "_free_bytes", lambda f: 0)
  else:
    folder.chmod(0o555)
  try:
    cache = image_cache.cached_images(split, "eval", 16,
                                      image_cache.CachePolicy("memory", str(folder)))
    assert cache.in_memory and len(cache) == len(split)
    expected = np.stack(list(image_cache.transform_in_memory(split.images, "eval", 16)))
    np.testing.assert_array_equal(cache.gather(np.arange(len(split))), expected)
    with pytest.raises(image_cache.CacheError) as e:  # disk: nowhere to write, one line
      image_cache.cached_images(split, "eval", 16, image_cache.CachePolicy("disk", str(folder)))
    _one_line(e.value)
  finally:
    folder.chmod(0o755)


def test_unfinished_cache_files_of_a_dead_build_are_removed(tmp_path):
  from hn_jax.data import image_cache  # pylint: disable=import-outside-toplevel
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  dead_pid = int(dead.stdout)
  path = tmp_path / "x-eval16-abc.hnimg"
  host = image_cache._host()  # pylint: disable=protected-access
  stale = tmp_path / f"{path.name}.tmp-{host}-{dead_pid}-0123abcd"
  live = tmp_path / f"{path.name}.tmp-{host}-{os.getpid()}-4567abcd"
  other_host = tmp_path / f"{path.name}.tmp-elsewhere-{dead_pid}-89abcdef"
  for f in (stale, live, other_host):
    f.write_bytes(b"partial")
  assert image_cache.remove_stale_temporaries(str(path)) == [stale.name]
  assert live.exists() and other_host.exists() and not stale.exists()


# Files a command writes --------------------------------------------------------------------------


def test_outputs_never_touch_a_runs_files(tiny_run, tmp_path):
  workdir = _copy(tiny_run[0], tmp_path)
  for target in (workdir / "config.json", workdir / "checkpoints" / "index.npz",
                 workdir / "checkpoints" / "28" / "x.png", workdir / "run.lock"):
    with pytest.raises(output_files.OutputRefused, match="never overwrites") as e:
      output_files.check(str(target), "--out", overwrite=True)
    _one_line(e.value)
  existing = tmp_path / "index.npz"
  existing.write_bytes(b"keep")
  with pytest.raises(output_files.OutputRefused, match="exists; .* --overwrite"):
    output_files.check(str(existing), "--out", overwrite=False)
  output_files.check(str(existing), "--out", overwrite=True)
  output_files.check(str(workdir / "embeddings.npz"), "--out", overwrite=False)  # beside: fine


def test_embed_out_refuses_config_json_before_loading_anything(tiny_run, tmp_path, capsys):
  from hn_jax.tools import embed  # pylint: disable=import-outside-toplevel
  workdir = _copy(tiny_run[0], tmp_path)
  before = (workdir / "config.json").read_bytes()
  status = embed.main([f"--workdir={workdir}", f"--out={workdir / 'config.json'}",
                       "--split=test", "--overwrite"])
  err = capsys.readouterr().err.strip()
  assert status == 2 and "never overwrites" in err
  _one_line(err)
  assert (workdir / "config.json").read_bytes() == before


def test_full_disk_while_writing_an_output_leaves_the_old_file(tmp_path):
  out = tmp_path / "index.npz"
  out.write_bytes(b"old index")

  def fill(f):
    f.write(b"half of it")
    raise OSError(errno.ENOSPC, "No space left on device")
  with pytest.raises(output_files.OutputRefused, match="free space there") as e:
    output_files.write(str(out), "--out", fill)
  _one_line(e.value)
  assert out.read_bytes() == b"old index"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["index.npz"]  # no temporary left


def _index(tmp_path, name="index.npz", **changes):
  record = dict(embeddings=np.eye(4, 8, dtype=np.float32), labels=np.arange(4),
                ids=np.asarray([f"a{i}" for i in range(4)]), embedding_dim=8, kind="folder",
                source="folder x", dataset="", split="", data_dir="", workdir="w",
                checkpoint="0" * 32)
  record.update(changes)
  path = tmp_path / name
  np.savez(path, **record)
  return path


@pytest.mark.parametrize("changes,problem", [
    (dict(embeddings=np.zeros((0, 8), np.float32), labels=np.zeros(0), ids=np.zeros(0, str)),
     "holds no embedding"),
    (dict(labels=np.arange(3)), "4 embeddings but 3 labels"),
    (dict(ids=np.asarray(["a"])), "4 embeddings but 1 ids"),
    (dict(embedding_dim=16), "dimension 8 but it says 16"),
    (dict(embeddings=np.full((4, 8), np.nan, np.float32)), "4 of its 4 embeddings are not finite"),
])
def test_unusable_index_is_one_line(changes, problem, tmp_path):
  from hn_jax.tools import search  # pylint: disable=import-outside-toplevel
  with pytest.raises(search.SearchError, match=problem) as e:
    search.load_index(str(_index(tmp_path, **changes)))
  _one_line(e.value)


def test_non_finite_embeddings_are_refused():
  from hn_jax.tools import embed  # pylint: disable=import-outside-toplevel
  embeddings = np.ones((3, 4), np.float32)
  embed.check_finite(embeddings, ["a", "b", "c"], "images")
  embeddings[1, 2] = np.inf
  with pytest.raises(embed.EmbedError, match="1 of 3 images .* not finite .first: b") as e:
    embed.check_finite(embeddings, ["a", "b", "c"], "images")
  _one_line(e.value)


def test_out_of_memory_reading_an_image_is_not_an_unreadable_image(tmp_path, monkeypatch):
  from hn_jax.tools import embed  # pylint: disable=import-outside-toplevel
  path = tmp_path / "big.png"
  Image.new("RGB", (8, 8)).save(path)

  def no_memory(*a, **k):
    raise MemoryError()
  monkeypatch.setattr(Image.Image, "load", no_memory)
  with pytest.raises(embed.EmbedError, match="out of memory reading") as e:
    embed.read_image(str(path))
  _one_line(e.value)


@pytest.mark.slow
def test_search_refuses_another_checkpoint_and_embed_records_its_own(tiny_run, tmp_path,
                                                                    monkeypatch, capsys):
  from hn_jax.tools import embed, search  # pylint: disable=import-outside-toplevel
  workdir = _copy(tiny_run[0], tmp_path)
  folder = tmp_path / "images"
  folder.mkdir()
  for i in range(3):
    Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
  index = tmp_path / "index.npz"
  record = embed.embed_to_file(str(workdir), str(index), images=str(folder), progress=False)
  assert len(record["checkpoint"]) == 32 and record["checkpoint_step"] == 28
  # The same checkpoint: searched; another one (the run's step 14): refused, one line.
  search.search(str(index), queries=[str(folder)], k=2, out=io.StringIO())
  earlier = _copy(workdir, tmp_path, "earlier")
  shutil.rmtree(earlier / "checkpoints" / "28")
  with pytest.raises(search.SearchError, match="embedded by checkpoint .* --allow_other") as e:
    search.search(str(index), queries=[str(folder)], k=2, workdir=str(earlier),
                  out=io.StringIO())
  _one_line(e.value)
  search.search(str(index), queries=[str(folder)], k=2, workdir=str(earlier),
                out=io.StringIO(), allow_other_checkpoint=True)
  assert "searching anyway" in capsys.readouterr().err
  # An existing file is kept unless --overwrite; out of memory names the batch.
  with pytest.raises(embed.EmbedError, match="exists"):
    embed.embed_to_file(str(workdir), str(index), images=str(folder), progress=False)

  def no_memory(*a, **k):
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 3.1GiB")
  monkeypatch.setattr(embed, "embed_images", no_memory)
  with pytest.raises(embed.EmbedError, match="out of memory while embedding; lower .* "
                     "--eval_batch_size") as e:
    embed.embed_to_file(str(workdir), str(tmp_path / "new.npz"), images=str(folder),
                        progress=False)
  _one_line(e.value)
  assert not (tmp_path / "new.npz").exists()


# Prepared datasets -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
  """A fake CUB layout (hn_jax.testing.fake_datasets) prepared once: (layout, data_dir)."""
  from hn_jax.testing import fake_datasets  # pylint: disable=import-outside-toplevel
  from hn_jax.tools import prepare  # pylint: disable=import-outside-toplevel
  raw = tmp_path_factory.mktemp("raw_cub")
  data_dir = tmp_path_factory.mktemp("data_cub")
  expected = fake_datasets.write_cub(str(raw))
  prepare.prepare("cub", expected.root, str(data_dir), progress=False)
  return expected, data_dir


def _prepared_files(data_dir: Path) -> dict[str, bytes]:
  return {os.fspath(p.relative_to(data_dir)): p.read_bytes()
          for p in sorted(data_dir.rglob("*")) if p.is_file() and p.name != "prepare.lock"}


def test_overwrite_with_a_wrong_manual_dir_keeps_the_prepared_copy(cub, tmp_path):
  from hn_jax.data.tfds_builders import LayoutError  # pylint: disable=import-outside-toplevel
  from hn_jax.tools import prepare  # pylint: disable=import-outside-toplevel
  _, data_dir = cub
  before = _prepared_files(data_dir)
  wrong = tmp_path / "not_cub"
  wrong.mkdir()
  with pytest.raises((LayoutError, prepare.PrepareError)) as e:
    prepare.prepare("cub", str(wrong), str(data_dir), overwrite=True, progress=False)
  _one_line(e.value)
  assert _prepared_files(data_dir) == before


def test_full_disk_during_an_overwrite_keeps_the_prepared_copy(cub, monkeypatch):
  from hn_jax.data.tfds_builders import common  # pylint: disable=import-outside-toplevel
  from hn_jax.tools import prepare  # pylint: disable=import-outside-toplevel
  expected, data_dir = cub
  before = _prepared_files(data_dir)
  calls, check_image = [], common.check_image

  def full_disk(path):  # the fourth image meets a full disk
    calls.append(path)
    if len(calls) > 3:
      raise OSError(errno.ENOSPC, "No space left on device")
    return check_image(path)
  monkeypatch.setattr(common, "check_image", full_disk)
  with pytest.raises(prepare.PrepareError, match="no room left in .* nothing prepared was "
                     "replaced") as e:
    prepare.prepare("cub", expected.root, str(data_dir), overwrite=True, progress=False)
  _one_line(e.value)
  assert _prepared_files(data_dir) == before
  assert not [p for p in (data_dir / "hn_cub").iterdir() if p.name.startswith("rebuild-")]


def test_two_prepares_at_once_and_leftovers_of_a_killed_one(cub):
  from hn_jax.tools import prepare  # pylint: disable=import-outside-toplevel
  expected, data_dir = cub
  folder = data_dir / "hn_cub"
  with run_lock.WorkdirLock(folder, lock_file=prepare.LOCK_FILE, what="prepare of cub"):
    with pytest.raises(prepare.PrepareError, match="in use by another prepare of cub") as e:
      prepare.prepare("cub", expected.root, str(data_dir), progress=False)
    _one_line(e.value)
  leftovers = [folder / "incomplete.ABC123_1.1.0", folder / "rebuild-999999"]
  for p in leftovers:
    (p / "x").mkdir(parents=True)
  builder = prepare.prepare("cub", expected.root, str(data_dir), progress=False)
  assert builder.is_prepared() and not any(p.exists() for p in leftovers)


def _png_tensorflow_refuses() -> bytes:
  """An 8-bit RGB PNG whose IDAT checksum is wrong: PIL decodes it, libpng (TF) does not."""
  out = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 20, 3), np.uint8)).save(
      out, "PNG")
  data = bytearray(out.getvalue())
  at = data.find(b"IDAT")
  data[at + 4 + struct.unpack(">I", data[at - 4:at])[0]] ^= 0xFF
  return bytes(data)


def test_images_tensorflow_cannot_decode_are_skipped_and_named(tmp_path):
  from hn_jax.testing import fake_datasets  # pylint: disable=import-outside-toplevel
  from hn_jax.tools import prepare  # pylint: disable=import-outside-toplevel
  expected = fake_datasets.write_cub(str(tmp_path / "raw"))
  first = expected.splits["train"][0][1]  # image_id of the first sound training image
  lines = (Path(expected.root) / "images.txt").read_text().splitlines()
  relative = dict(line.split(" ", 1) for line in lines)[first]
  target = Path(expected.root) / "images" / relative
  target.write_bytes(_png_tensorflow_refuses())
  with Image.open(target) as image:
    image.load()  # PIL reads it
  builder = prepare.prepare("cub", expected.root, str(tmp_path / "data"), progress=False)
  skipped = dict(map(tuple, builder.info.metadata["skipped"]))
  assert skipped[str(target)].startswith("TensorFlow cannot decode it"), skipped
  assert first not in builder.info.metadata["splits"]["train"]["image_ids"]


def test_image_paths_outside_the_layout_are_refused(tmp_path):
  from hn_jax.data.tfds_builders import LayoutError  # pylint: disable=import-outside-toplevel
  from hn_jax.testing import fake_datasets  # pylint: disable=import-outside-toplevel
  from hn_jax.tools import prepare  # pylint: disable=import-outside-toplevel
  expected = fake_datasets.write_cub(str(tmp_path / "raw"))
  secret = tmp_path / "secret.jpg"
  secret.write_bytes(b"not yours")
  images_txt = Path(expected.root) / "images.txt"
  lines = images_txt.read_text().splitlines()
  lines[0] = "1 ../../../secret.jpg"
  lines[1] = f"2 {secret}"
  images_txt.write_text("\n".join(lines) + "\n")
  with pytest.raises(LayoutError, match="name 2 image paths outside it .*secret.jpg") as e:
    prepare.prepare("cub", expected.root, str(tmp_path / "data"), progress=False)
  _one_line(e.value)
  assert not (tmp_path / "data" / "hn_cub" / "1.1.0").exists()


# A compilation cache others can write ------------------------------------------------------------


def test_a_compilation_cache_others_can_write_is_refused(tmp_path):
  """reproduce's ROOT/xla_cache (and every command's default cache) goes through
  hn_jax.compile_cache: created private, or not used, in one line naming the fix."""
  made = tmp_path / "xla_cache"
  assert compile_cache.prepare(made) is None
  assert stat.S_IMODE(os.stat(made).st_mode) == 0o700 and compile_cache.problem(made) is None
  shared = tmp_path / "shared"
  shared.mkdir()
  shared.chmod(0o777)
  reason = _one_line(compile_cache.prepare(shared))
  assert "others may write" in reason and "(mode 0777)" in reason and "chmod go-w" in reason
  # Not used, in one warning line: tests/test_compile_cache.py (a cache others can write).


def test_an_undecodable_image_prepared_earlier_stops_training_in_one_line(tmp_path, monkeypatch):
  """A dataset prepared before prepare checked images with TensorFlow: one line naming the
  dataset and the command that fixes it, not a traceback, when its cache is built."""
  from hn_jax.data import datasets, image_cache  # pylint: disable=import-outside-toplevel
  from hn_jax.data.tfds_builders import common  # pylint: disable=import-outside-toplevel
  from hn_jax.testing import fake_datasets  # pylint: disable=import-outside-toplevel
  from hn_jax.tools import prepare  # pylint: disable=import-outside-toplevel
  expected = fake_datasets.write_cub(str(tmp_path / "raw"))
  relative = (Path(expected.root) / "images.txt").read_text().split()[1]
  (Path(expected.root) / "images" / relative).write_bytes(_png_tensorflow_refuses())
  monkeypatch.setattr(common, "training_decoder_problem", lambda data: None)  # the old check
  prepare.prepare("cub", expected.root, str(tmp_path / "data"), progress=False)
  monkeypatch.undo()
  dataset = datasets.load(tiny_config(dataset="cub", data_dir=str(tmp_path / "data")))
  for mode in ("auto", "memory"):
    with pytest.raises(image_cache.UndecodableImage, match="prepare it again with .* "
                       "--dataset=cub --overwrite") as e:
      image_cache.cached_images(dataset.train, "eval", 16,
                                image_cache.CachePolicy(mode, str(tmp_path / f"cache_{mode}")))
    _one_line(e.value)


@pytest.mark.slow  # builds another model's state (6 s)
def test_checkpoint_of_another_model_is_not_damage(tiny_run, tmp_path):
  from hn_jax import sharding, train_step  # pylint: disable=import-outside-toplevel
  workdir = _copy(tiny_run[0], tmp_path)
  _, state, _ = train_step.init_state(tiny_config(model="googlenet_mini"), steps_per_epoch=14,
                                      read_weights=False)
  state = sharding.replicate(state, sharding.create_mesh())
  manager = checkpoints_lib.manager(workdir, create=False)
  with pytest.raises(errors.CheckpointMismatch, match="config.model") as e:
    checkpoints_lib.restore_newest_good(manager, state, say=lambda *a: None)
  manager.close()
  _one_line(e.value)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["14", "28"]
  assert not (workdir / checkpoints_lib.DAMAGED_FOLDER).exists()
