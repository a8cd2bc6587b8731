"""What a run shows in TensorBoard (hn_jax.summaries), checked through TensorBoard's own server.

The quick tests check the pieces against NumPy references; the slow ones read the tiny run of
tests/conftest.py (its event files, and a TensorBoard server's HTTP API over it).
"""

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import ml_collections
import numpy as np
import pytest

from hn_jax import summaries

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                    "tensorboard.md")


def test_sample_points_takes_whole_classes_in_a_seeded_order():
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 40, size=500)
  chosen = summaries.sample_points(labels, 120)
  assert len(chosen) == 120 and np.all(np.diff(chosen) > 0)
  np.testing.assert_array_equal(chosen, summaries.sample_points(labels, 120))
  counts = {c: int(np.sum(labels == c)) for c in np.unique(labels)}
  taken = {c: int(np.sum(labels[chosen] == c)) for c in np.unique(labels[chosen])}
  assert sum(taken[c] < counts[c] for c in taken) <= 1  # only the last class is cut short
  assert not np.array_equal(chosen, summaries.sample_points(labels, 120, seed=1))
  np.testing.assert_array_equal(summaries.sample_points(labels, 500), np.arange(500))
  assert len(summaries.sample_points(labels, 0)) == 0


def test_nearest_equals_a_float64_reference():
  rng = np.random.default_rng(0)
  queries, gallery = rng.normal(size=(6, 5)), rng.normal(size=(40, 5))
  exclude = np.array([3, -1, 0, 39, -1, 7])
  got = summaries.nearest(queries.astype(np.float32), gallery.astype(np.float32), 4, exclude)
  q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
  sims = q @ g.T
  for row, e in enumerate(exclude):
    if e >= 0:
      sims[row, e] = -np.inf
  np.testing.assert_array_equal(got, np.argsort(-sims, axis=1)[:, :4])
  # Ties: the lower gallery index first.
  tied = summaries.nearest(np.ones((1, 2)), np.ones((5, 2)), 3)
  np.testing.assert_array_equal(tied, [[0, 1, 2]])


def test_query_indices_are_distinct_classes_then_repeat():
  labels = np.array([0, 0, 1, 1, 1, 2])
  chosen = summaries.query_indices(labels, 5)
  assert sorted(labels[chosen[:3]].tolist()) == [0, 1, 2]
  assert len(set(chosen.tolist())) == 5
  np.testing.assert_array_equal(chosen, summaries.query_indices(labels, 5))


def test_sprite_puts_thumbnail_i_at_row_i_div_g_column_i_mod_g():
  thumbs = np.arange(7, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
  sprite = summaries.sprite_image(thumbs)
  assert sprite.shape == (6, 6, 3)  # a 3 x 3 grid of 2-pixel thumbnails
  for i in range(7):
    r, c = divmod(i, 3)
    assert np.all(sprite[2 * r:2 * r + 2, 2 * c:2 * c + 2] == i)
  assert np.all(sprite[4:, 2:] == 255)  # the two empty cells
  assert summaries.sprite_thumb(2000) == summaries.SPRITE_THUMB
  assert summaries.sprite_thumb(10**6) * 1000 <= summaries.SPRITE_MAX


def test_flat_hparams():
  config = ml_collections.ConfigDict({"seed": 1, "mean": (0.5, 0.25), "loss": "sct",
                                      "half_precision": False, "inner": {"a": 2.5}})
  flat = summaries.flat_hparams(config)
  assert flat == {"loss": "sct", "seed": 1, "half_precision": False, "inner.a": 2.5,
                  "mean": "(0.5, 0.25)"}
  assert list(flat) == sorted(flat)


def test_hparams_file_is_replaced_and_keeps_the_first_start_time(tmp_path):
  from hn_jax.tools import report
  from tensorboard.compat.proto import event_pb2
  from tensorboard.plugins.hparams import metadata

  def read(path):
    tags = {}
    for record in report.iter_records(path):
      for value in event_pb2.Event.FromString(record).summary.value:
        tags[value.tag] = value.metadata.plugin_data.content
    return tags

  config = ml_collections.ConfigDict({"seed": 0, "learning_rate": 0.1})
  first = summaries.write_hparams(tmp_path, config)
  began = metadata.parse_session_start_info_plugin_data(
      read(first)[metadata.SESSION_START_INFO_TAG]).start_time_secs
  config.learning_rate = 0.01
  second = summaries.write_hparams(tmp_path, config, finished=True)
  assert not first.exists() and list(tmp_path.iterdir()) == [second]
  tags = read(second)
  assert set(tags) == {metadata.SESSION_START_INFO_TAG, metadata.SESSION_END_INFO_TAG}
  start = metadata.parse_session_start_info_plugin_data(tags[metadata.SESSION_START_INFO_TAG])
  assert start.hparams["learning_rate"].number_value == pytest.approx(0.01)
  assert start.start_time_secs == began
  assert report.load_scalars(tmp_path) == {}  # no scalar for the paper's tables


def test_projector_files_of_other_points_replace_the_old(tmp_path):
  from google.protobuf import text_format
  from tensorboard.plugins.projector import projector_config_pb2
  thumbs = np.zeros((4, 2, 2, 3), np.uint8)
  rng = np.random.default_rng(0)
  assert summaries.write_projector_points(tmp_path, {"label": [1, 1, 2, 2], "index": [0, 1, 2, 3]},
                                          thumbs)
  summaries.add_projector_tensor(tmp_path, "a", rng.normal(size=(4, 3)), 2)
  assert not summaries.write_projector_points(
      tmp_path, {"label": [1, 1, 2, 2], "index": [0, 1, 2, 3]}, thumbs)
  x = rng.normal(size=(4, 3))
  path = summaries.add_projector_tensor(tmp_path, "b", x, 2)
  np.testing.assert_allclose(np.loadtxt(path), x / np.linalg.norm(x, axis=1, keepdims=True),
                             rtol=1e-6)
  config = text_format.Parse((tmp_path / summaries.PROJECTOR_CONFIG).read_text(),
                             projector_config_pb2.ProjectorConfig())
  assert [e.tensor_name for e in config.embeddings] == ["a", "b"]
  assert list(config.embeddings[1].tensor_shape) == [4, 3]
  assert (tmp_path / "projector" / "metadata.tsv").read_text().splitlines()[:2] == [
      "label\tindex", "1\t0"]
  # Other points: the old tensors go.
  assert summaries.write_projector_points(tmp_path, {"label": [1, 2], "index": [0, 2]},
                                          thumbs[:2])
  assert sorted(p.name for p in (tmp_path / "projector").iterdir()) == ["metadata.tsv",
                                                                        "sprite.png"]
  assert not (tmp_path / summaries.PROJECTOR_CONFIG).exists()


# ----------------------------------------------------------------------------- the tiny run


def documented_keys() -> dict[str, str]:
  """key -> "step" or "epoch", from the table of docs/tensorboard.md."""
  keys = {}
  with open(DOCS) as f:
    for line in f:
      m = re.match(r"^\|\s*`([^`]+)`\s*\|\s*(step|epoch)\s*\|", line)
      if m:
        keys[m.group(1)] = m.group(2)
  return keys


@pytest.mark.slow
def test_no_key_mixes_steps_and_epochs_and_every_key_is_documented(tiny_run):
  from hn_jax.testing.runs import tiny_config
  from hn_jax.tools import report
  workdir, _ = tiny_run
  config = tiny_config()
  scalars = report.load_scalars(workdir)
  documented = documented_keys()
  for tag, points in scalars.items():
    pattern = re.sub(r"^DIGITS_", "<DATA>_", tag)
    pattern = re.sub(r"(_test_(?:chain_)?R_)\d+$", r"\1<K>", pattern)
    assert pattern in documented, f"{tag} is not in docs/tensorboard.md's table"
    steps = [p[0] for p in points]
    if documented[pattern] == "epoch":
      assert max(steps) <= config.num_epochs, tag
    else:
      assert min(steps) >= 1 and max(steps) > config.num_epochs, tag


def _free_port() -> int:
  with contextlib.closing(socket.socket()) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _get(port: int, path: str, data: dict | None = None) -> bytes:
  body = None if data is None else json.dumps(data).encode()
  request = urllib.request.Request(f"http://127.0.0.1:{port}/{path}", data=body,
                                   headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(request, timeout=30) as response:
    return response.read()


@pytest.mark.slow
def test_tensorboard_serves_scalars_hparams_projector_and_images(tiny_run, tmp_path):
  from hn_jax.tools import embed
  workdir, metrics = tiny_run
  logdir = tmp_path / "logs"
  shutil.copytree(workdir, logdir / "run", ignore=shutil.ignore_patterns("checkpoints"))
  embed.embed_to_file(str(workdir), None, split="test", progress=False,
                      projector=str(logdir / "embedded"), projector_points=100)
  port = _free_port()
  server = subprocess.Popen(
      [sys.executable, "-m", "tensorboard.main", f"--logdir={logdir}", f"--port={port}",
       "--host=127.0.0.1", "--load_fast=false"], stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  try:
    deadline = time.monotonic() + 120
    while True:
      try:
        runs = json.loads(_get(port, "data/runs"))
        if "run" in runs:
          break
      except OSError:
        pass
      assert server.poll() is None, server.stderr.read().decode()[-2000:]
      assert time.monotonic() < deadline, "TensorBoard did not start"
      time.sleep(0.5)

    tags = json.loads(_get(port, "data/plugin/scalars/tags"))["run"]
    assert {"DIGITS_test_R_1", "DIGITS_test_MAP_R", "loss", "hn_ratio"} <= set(tags)

    experiment = json.loads(_get(port, "data/plugin/hparams/experiment",
                                 {"experimentName": ""}))
    assert {"seed", "learning_rate", "loss"} <= {h["name"] for h in experiment["hparamInfos"]}
    assert {"DIGITS_test_R_1", "DIGITS_test_MAP_R", "loss", "learning_rate"} <= {
        m["name"]["tag"] for m in experiment["metricInfos"]}
    groups = json.loads(_get(port, "data/plugin/hparams/session_groups", {
        "experimentName": "", "startIndex": 0, "sliceSize": 10,
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                            "STATUS_RUNNING"]}))["sessionGroups"]
    assert len(groups) == 1 and groups[0]["sessions"][0]["status"] == "STATUS_SUCCESS"
    assert groups[0]["hparams"]["loss"] == "sct"
    values = {m["name"]["tag"]: m["value"] for m in groups[0]["metricValues"]}
    assert values["DIGITS_test_R_1"] == pytest.approx(metrics["DIGITS_test_R_1"], rel=1e-6)
    assert values["DIGITS_test_MAP_R"] == pytest.approx(metrics["DIGITS_test_MAP_R"], rel=1e-6)

    assert set(json.loads(_get(port, "data/plugin/projector/runs"))) >= {"run", "embedded"}
    info = json.loads(_get(port, "data/plugin/projector/info?run=run"))
    (entry,) = info["embeddings"]
    name = entry["tensorName"]
    assert name == "DIGITS_test_epoch_2"
    n, dim = entry["tensorShape"]
    assert n == 896 and dim == 16  # the whole test split (under the cap)
    tensor = np.frombuffer(_get(port, f"data/plugin/projector/tensor?run=run&name={name}"),
                           np.float32).reshape(n, dim)
    np.testing.assert_allclose(np.linalg.norm(tensor, axis=1), 1, rtol=1e-5)
    rows = _get(port, f"data/plugin/projector/metadata?run=run&name={name}").decode().split("\n")
    assert rows[0] == "label\tindex" and len([r for r in rows if r]) == n + 1
    sprite = _get(port, f"data/plugin/projector/sprite_image?run=run&name={name}")
    assert sprite[:8] == b"\x89PNG\r\n\x1a\n"
    embedded = json.loads(_get(port, "data/plugin/projector/info?run=embedded"))
    assert [(e["tensorName"], e["tensorShape"]) for e in embedded["embeddings"]] == [
        ("digits_test", [100, 16])]
    rows = _get(port, "data/plugin/projector/metadata?run=embedded&name=digits_test").decode()
    assert rows.split("\n")[0] == "label\tindex\tid"

    images = json.loads(_get(port, "data/plugin/images/tags"))["run"]
    assert "DIGITS_test_neighbours" in images
    series = json.loads(_get(port, "data/plugin/images/images?run=run&tag="
                                   "DIGITS_test_neighbours"))
    assert [s["step"] for s in series] == [0, 1, 2]  # every evaluation, by epoch
    png = _get(port, f"data/plugin/images/individualImage?{series[-1]['query']}")
    from PIL import Image
    import io
    sheet = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    cell = summaries.NEIGHBOURS_THUMB + 2 * summaries.sheets.FRAME
    assert sheet.shape == (8 * cell, (1 + summaries.NEIGHBOURS_K) * cell, 3)
    assert tuple(sheet[0, 0]) == summaries.sheets.COLORS["query"]
  finally:
    server.kill()  # TensorBoard may sit out a SIGTERM (seen under load)
    server.wait(timeout=30)


def test_neighbour_sheet_frames_correct_green_and_wrong_red():
  images = [np.full((4, 4, 3), 100, np.uint8)] * 6
  top = np.array([[1, 2], [0, 3]])
  sheet = summaries.neighbour_sheet(images[:2], [7, 8], top, lambda rows: [images[i] for i in rows],
                                    np.array([8, 7, 9, 9]), thumb=4)
  cell = 4 + 2 * summaries.sheets.FRAME
  assert sheet.shape == (2 * cell, 3 * cell, 3)
  colors = summaries.sheets.COLORS
  expected = [["query", "correct", "wrong"], ["query", "correct", "wrong"]]
  for r, row in enumerate(expected):
    for c, name in enumerate(row):
      assert tuple(sheet[r * cell, c * cell]) == colors[name], (r, c)


def test_views_benchmark_smoke(tmp_path):
  """benchmarks/tensorboard_views.py --smoke (tests/test_benchmarks_smoke.py lists it here)."""
  from hn_jax.testing import benchmarks
  out = tmp_path / "views.json"
  benchmarks.load("tensorboard_views").main(["--smoke", f"--json={out}"])
  result = json.loads(out.read_text())["synthetic"]
  assert result["sampled"] == 100 and result["thumb"] == summaries.SPRITE_THUMB
  assert set(result["file_bytes"]) == {"metadata.tsv", "sprite.png", "test_epoch_1.tsv"}
  assert 0 < result["later_evaluation_s"] <= result["first_evaluation_s"]


class _Images:
  """A metric writer that keeps what write_images gets."""

  def __init__(self):
    self.images = []

  def write_images(self, step, images):
    self.images.append((step, images))


def _toy_dataset(n=40):
  from hn_jax.data.datasets import Dataset
  from hn_jax.data.splits import Split
  rng = np.random.default_rng(0)
  split = Split(rng.integers(0, 255, size=(n, 12, 10, 3), dtype=np.uint8), np.arange(n) % 4)
  return Dataset(key="TOY", train=split, test=split, test_ks=(1,), train_recall=False)


def test_run_summaries_write_the_projector_at_the_end_and_neighbours_each_time(tmp_path):
  dataset = _toy_dataset()
  config = ml_collections.ConfigDict({"projector_points": 25, "projector_every_eval": False,
                                      "neighbour_queries": 3, "image_size": 10, "cache": "off"})
  writer = _Images()
  views = summaries.RunSummaries(config, dataset, tmp_path)
  embeddings = np.random.default_rng(1).normal(size=(40, 5)).astype(np.float32)
  views.evaluated(0, {id(dataset.test): embeddings}, writer, final=False)
  assert not (tmp_path / summaries.PROJECTOR_CONFIG).exists()
  views.evaluated(3, {id(dataset.test): embeddings}, writer, final=True)
  assert sorted(p.name for p in (tmp_path / "projector").iterdir()) == [
      "TOY_test_epoch_3.tsv", "metadata.tsv", "sprite.png"]
  rows = summaries.sample_points(dataset.test.labels, 25)
  np.testing.assert_allclose(
      np.loadtxt(tmp_path / "projector" / "TOY_test_epoch_3.tsv"),
      embeddings[rows] / np.linalg.norm(embeddings[rows], axis=1, keepdims=True), rtol=1e-6)
  assert [step for step, _ in writer.images] == [0, 3]
  (sheet,) = writer.images[-1][1]["TOY_test_neighbours"]
  cell = summaries.NEIGHBOURS_THUMB + 2 * summaries.sheets.FRAME
  assert sheet.shape == (3 * cell, (1 + summaries.NEIGHBOURS_K) * cell, 3)


def test_a_view_that_cannot_be_written_is_reported_not_fatal(tmp_path, caplog):
  (tmp_path / "file").write_text("")
  views = summaries.RunSummaries(ml_collections.ConfigDict({"projector_points": 0}),
                                 _toy_dataset(), tmp_path / "file" / "run")
  views.started()  # the workdir cannot be made: a warning
  assert any("TensorBoard views not written" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("key,value,message", [
    ("projector_points", -1, "config.projector_points=-1 must be a non-negative integer"),
    ("neighbour_queries", 2.5, "config.neighbour_queries=2.5 must be a non-negative integer"),
    ("projector_every_eval", "yes", "config.projector_every_eval='yes' must be True or False")])
def test_bad_view_settings_are_refused_in_one_line(key, value, message):
  from hn_jax import run_config
  config = ml_collections.ConfigDict(run_config.defaults().to_dict(), type_safe=False)
  config[key] = value
  with pytest.raises(run_config.ConfigError, match=re.escape(message)):
    run_config.validate(config, num_devices=1, num_processes=1)


def test_a_full_disk_under_the_views_stops_the_run_in_one_line(tmp_path, monkeypatch):
  import errno
  from hn_jax import errors

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(summaries, "write_hparams", full)
  views = summaries.RunSummaries(ml_collections.ConfigDict({"projector_points": 0}),
                                 _toy_dataset(), tmp_path)
  with pytest.raises(errors.DiskFull, match="^no room for the TensorBoard views in .*resume$"):
    views.started()
