"""A workdir belongs to one config: the resume check and the history of changed settings."""

import json

import pytest

from configs import digits
from hn_jax import run_config


def test_a_fresh_workdir_has_nothing_to_compare(tmp_path):
  assert run_config.check(digits.get_config(), str(tmp_path)) == {}


def test_settings_that_shape_the_run_stop_it_in_one_line(tmp_path):
  run_config.record(digits.get_config(), str(tmp_path))
  config = digits.get_config()
  config.embedding_dim = 64
  config.loss = "hn"
  config.mean = (0.5, 0.5, 0.5)
  config.num_epochs = 30  # changeable: not named
  with pytest.raises(run_config.ConfigMismatch) as error:
    run_config.check(config, str(tmp_path))
  message = str(error.value)
  assert "\n" not in message
  assert "config.embedding_dim=64 but the run has 32" in message
  assert 'config.loss="hn" but the run has "sct"' in message
  assert "config.mean=[0.5, 0.5, 0.5] but the run has [0.305, 0.305, 0.305]" in message
  assert "num_epochs" not in message and "use a new --workdir" in message


def test_tuples_and_lists_compare_equal(tmp_path):
  run_config.record(digits.get_config(), str(tmp_path))
  assert run_config.check(digits.get_config(), str(tmp_path)) == {}


def test_a_setting_missing_on_one_side_counts_unless_changeable():
  old = {"loss": "sct", "num_epochs": 20}
  assert run_config.differences(old, {"loss": "sct", "num_epochs": 20, "cache": True}) == {
      "cache": ("(not set)", True)}
  with_new_key = {"loss": "sct", "num_epochs": 20, "new_setting": 1}
  assert set(run_config.differences(old, with_new_key)) == {"new_setting"}
  assert "new_setting" not in run_config.CHANGEABLE


def test_a_run_recorded_before_a_setting_existed_resumes_at_its_default(tmp_path):
  run_config.record(digits.get_config(), str(tmp_path))
  path = tmp_path / run_config.CONFIG_FILE
  recorded = json.loads(path.read_text())
  del recorded["optimizer"], recorded["weight_decay"]  # as an older hn_jax wrote it
  path.write_text(json.dumps(recorded))
  assert run_config.check(digits.get_config(), str(tmp_path)) == {}
  config = digits.get_config()
  config.optimizer = "adamw"
  with pytest.raises(run_config.ConfigMismatch, match='config.optimizer="adamw" but the run '
                     r"has \(not set\)"):
    run_config.check(config, str(tmp_path))


def test_changeable_settings_are_recorded_with_their_history(tmp_path):
  workdir = str(tmp_path)
  run_config.record(digits.get_config(), workdir)
  for epochs, every in ((25, 5), (30, 1)):
    config = digits.get_config()
    config.num_epochs, config.eval_every, config.cache = epochs, every, "memory"
    changes = run_config.check(config, workdir)
    run_config.record(config, workdir, changes)
  assert json.loads((tmp_path / "config.json").read_text())["num_epochs"] == 30
  history = json.loads((tmp_path / run_config.HISTORY_FILE).read_text())
  assert [h["changes"] for h in history] == [
      {"cache": ["auto", "memory"], "num_epochs": [20, 25]},
      {"eval_every": [5, 1], "num_epochs": [25, 30]}]
  assert all(h["time"].endswith("+00:00") for h in history)
  assert run_config.describe({"num_epochs": (20, 25)}) == "num_epochs 20 -> 25"


class _BucketOnDisk:
  """An epath backend that keeps `gs://BUCKET/...` under a local folder (no network)."""

  def __init__(self, root):
    from etils.epath import backend  # pylint: disable=g-import-not-at-top
    self._os = backend.os_backend
    self._root = str(root)
    self.calls = []

  def _local(self, path):
    path = str(path)
    assert path.startswith("gs://"), path
    return self._root + "/" + path[len("gs://"):]

  def __getattr__(self, name):
    method = getattr(self._os, name)

    def call(path, *args, **kwargs):
      self.calls.append((name, str(path)))
      if name in ("rename", "replace", "copy"):
        args = (self._local(args[0]),) + args[1:]
      result = method(self._local(path), *args, **kwargs)
      if name == "glob":
        return ["gs://" + r[len(self._root) + 1:] for r in result]
      return result

    return call


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """gs:// paths of etils' epath land in tmp_path/<bucket>/...; returns the fake backend."""
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  fake = _BucketOnDisk(tmp_path)
  real = gpath._GPath._backend  # pylint: disable=protected-access
  monkeypatch.setattr(gpath._GPath, "_backend", property(  # pylint: disable=protected-access
      lambda self: fake if self._uri_scheme == "gs" else real.fget(self)))
  return fake


@pytest.mark.slow
def test_a_bucket_workdir_is_written_in_the_bucket_not_on_local_disk(bucket, tmp_path,
                                                                      monkeypatch):
  """`gs://` workdirs (TPU pods) keep their URL: config.json, its history, the checkpoint
  folder and the neighbour lists go to the bucket, never to a local `./gs:/...` folder."""
  from hn_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from hn_jax.tools import embed  # pylint: disable=g-import-not-at-top
  workdir = "gs://bkt/runs/r1"
  monkeypatch.chdir(tmp_path)
  config = digits.get_config()
  run_config.record(config, workdir)
  assert json.loads((tmp_path / "bkt/runs/r1/config.json").read_text())["loss"] == "sct"
  config.num_epochs = 25
  changes = run_config.check(config, workdir)
  run_config.record(config, workdir, changes)
  history = json.loads((tmp_path / "bkt/runs/r1/config_history.json").read_text())
  assert history[0]["changes"] == {"num_epochs": [20, 25]}
  assert run_config.read(workdir).num_epochs == 25
  assert not (tmp_path / "gs:").exists()
  assert {name for name, path in bucket.calls} >= {"open", "exists"}

  # The checkpoint folder handed to Orbax is the bucket's.
  folders = []

  class Stop(Exception):
    pass

  def manager(directory, *args, **kwargs):
    folders.append(str(directory))
    raise Stop

  monkeypatch.setattr(checkpoints.ocp, "CheckpointManager", manager)
  with pytest.raises(Stop):
    embed.load_run(workdir)
  assert folders == ["gs://bkt/runs/r1/checkpoints"]
