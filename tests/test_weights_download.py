"""Published weights by name (hn_jax.weights_cache): downloaded once from a local HTTP server,
checked, renamed into place; every failure one line, nothing left in the cache."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import socket
import stat
import threading

import numpy as np
import pytest
from flax import nnx

from hn_jax import models, pretrained, run_config, train_step, weights_cache

PAYLOAD = b"fake weights " * 1000


class _Handler(http.server.BaseHTTPRequestHandler):
  files: dict[str, bytes] = {}
  truncate: set[str] = set()
  requests: list[str] = []

  def do_GET(self):  # noqa: N802 (http.server's name)
    name = self.path.lstrip("/")
    type(self).requests.append(name)
    if name not in self.files:
      self.send_error(404, "Not Found")
      return
    body = self.files[name]
    self.send_response(200)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body[: len(body) // 2] if name in self.truncate else body)

  def log_message(self, *args):  # quiet
    pass


@pytest.fixture(scope="module")
def server():
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{httpd.server_address[1]}"
  httpd.shutdown()
  httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch, server):
  """An empty cache under XDG_CACHE_HOME, the mirror pointed at the server, a fake entry."""
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  monkeypatch.setenv(weights_cache.URL_ENV, server + "/")
  _Handler.files = {"fake.npz": PAYLOAD, "short.npz": PAYLOAD}
  _Handler.truncate = {"short.npz"}
  _Handler.requests = []
  table = dict(weights_cache.PUBLISHED)
  digest = hashlib.sha256(PAYLOAD).hexdigest()
  for model, filename, sha in (("good", "fake.npz", digest), ("prefix", "fake.npz", digest[:8]),
                               ("unknown", "fake.npz", ""), ("bad_sha", "fake.npz", "0" * 64),
                               ("missing", "absent.npz", digest),
                               ("short", "short.npz", "")):
    table[("imagenet", model)] = weights_cache.Published(
        f"https://example.invalid/{filename}", filename, sha, f"test file {model}")
  monkeypatch.setattr(weights_cache, "PUBLISHED", table)
  return tmp_path / "xdg" / "hn_jax" / "weights"


def test_cache_folder_follows_xdg(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert weights_cache.cache_dir() == str(tmp_path / "hn_jax" / "weights")
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert weights_cache.cache_dir() == str(tmp_path / "home" / ".cache" / "hn_jax" / "weights")


def test_the_published_table():
  """Every model with weights has ImageNet's; torchvision's digests agree with the prefix in
  their file names (what torch.hub checks); the URLs are the publishers'."""
  assert sorted(weights_cache.models_with("imagenet")) == sorted(run_config.PRETRAINED_MODELS)
  for (name, model), p in weights_cache.PUBLISHED.items():
    assert p.sha256 == "" or len(p.sha256) == 64
    if p.url.startswith("https://download.pytorch.org/models/"):
      prefix = p.filename.rsplit("-", 1)[1].split(".")[0]
      assert p.sha256.startswith(prefix) and p.url.endswith("/" + p.filename)
    assert os.path.splitext(p.filename)[1] in pretrained.SUPPORTED_EXTENSIONS
  assert weights_cache.PUBLISHED[("imagenet", "resnet50")].filename == "resnet50-0676ba61.pth"
  assert len({p.filename for p in weights_cache.PUBLISHED.values()}) == len(
      weights_cache.PUBLISHED)  # one cache name per file


def test_a_download_lands_once_checked_and_private(cache):
  path = weights_cache.resolve("imagenet", "good")
  assert path == str(cache / "fake.npz")
  assert open(path, "rb").read() == PAYLOAD
  assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
  assert os.listdir(cache) == ["fake.npz"]  # no temporary file left
  assert _Handler.requests == ["fake.npz"]
  assert weights_cache.resolve("imagenet", "good") == path  # the second time: from the cache
  assert weights_cache.resolve("imagenet", "prefix") == path  # a prefix of the digest checks too
  assert _Handler.requests == ["fake.npz"]


def test_unknown_checksum_is_downloaded_and_its_digest_logged(cache, caplog):
  with caplog.at_level("INFO"):
    path = weights_cache.fetch("imagenet", "unknown")
  assert open(path, "rb").read() == PAYLOAD
  assert hashlib.sha256(PAYLOAD).hexdigest() in caplog.text


def _refused_url() -> str:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return f"http://127.0.0.1:{port}"  # nothing listens there any more


@pytest.mark.parametrize("model, words", [
    ("bad_sha", "its sha256 is " + hashlib.sha256(PAYLOAD).hexdigest()),
    ("missing", "HTTP 404"),
    ("short", "truncated"),
    ("refused", "refused"),
])
def test_a_failed_download_is_one_line_and_leaves_nothing(cache, monkeypatch, model, words):
  filename = {"missing": "absent.npz", "short": "short.npz"}.get(model, "fake.npz")
  if model == "refused":
    monkeypatch.setenv(weights_cache.URL_ENV, _refused_url())
    model = "good"
  with pytest.raises(weights_cache.WeightsDownloadError) as error:
    weights_cache.resolve("imagenet", model)
  message = str(error.value)
  assert "\n" not in message and words in message, message
  assert f"/{filename}" in message and str(cache / filename) in message  # URL and where to put it
  assert f"download https://example.invalid/{filename} on a machine" in message  # the publisher's
  assert "--config.pretrained=PATH" in message
  assert not cache.exists() or os.listdir(cache) == []


def test_a_damaged_cached_file_is_refused_by_name(cache):
  cache.mkdir(parents=True)
  (cache / "fake.npz").write_bytes(PAYLOAD[:-1] + b"!")
  with pytest.raises(weights_cache.WeightsDownloadError, match="delete it to download it again"):
    weights_cache.fetch("imagenet", "good")
  assert _Handler.requests == []


def test_paths_and_random_init_pass_through(cache):
  assert weights_cache.resolve("", "resnet50") is None
  assert weights_cache.resolve("none", "resnet50") is None
  assert weights_cache.resolve("/some/file.pth", "resnet50") == "/some/file.pth"
  assert _Handler.requests == []


def _config(**overrides):
  config = run_config.defaults()
  config.update(model="small", image_size=32, embedding_dim=8)
  config.update(overrides)
  return config


def test_validation_before_anything_runs(tmp_path):
  def error(**overrides) -> str:
    with pytest.raises(run_config.ConfigError) as e:
      run_config.validate(_config(**overrides), num_devices=1, num_processes=1)
    return str(e.value)

  for value in ("", "none"):
    run_config.validate(_config(pretrained=value), num_devices=1, num_processes=1)
  run_config.validate(_config(model="resnet50", pretrained="imagenet"), num_devices=1,
                      num_processes=1)  # nothing is downloaded by validation
  assert "has no torchvision weights" in error(pretrained="imagenet")
  assert "only for vit_small_patch16, vit_base_patch16" in error(model="resnet50",
                                                                 pretrained="dino")
  assert "no such file" in error(model="resnet50", pretrained=str(tmp_path / "x.pth"))


def test_init_model_reads_the_downloaded_weights(cache, monkeypatch, caplog):
  """config.pretrained="imagenet" end to end: served, cached, read into the backbone."""
  abstract = nnx.eval_shape(lambda: models.create_model("small", 8, rngs=nnx.Rngs(0)))
  shapes = pretrained.expected_torchvision_shapes(nnx.state(abstract, nnx.Param),
                                                  nnx.state(abstract, nnx.BatchStat))
  rng = np.random.default_rng(0)
  sd = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  for k in [k for k in sd if k.endswith("running_var")]:
    sd[k] = np.abs(sd[k]) + 0.5
  width = shapes["conv1.weight"][0] * 8  # small's last stage: 8x the stem (checked below)
  sd["fc.weight"], sd["fc.bias"] = np.zeros((3, width), np.float32), np.zeros(3, np.float32)
  buffer = io.BytesIO()
  np.savez(buffer, **sd)
  _Handler.files["small.npz"] = buffer.getvalue()
  table = dict(weights_cache.PUBLISHED)
  table[("imagenet", "small")] = weights_cache.Published(
      "https://example.invalid/small.npz", "small.npz",
      hashlib.sha256(buffer.getvalue()).hexdigest(), "test weights of the small model")
  monkeypatch.setattr(weights_cache, "PUBLISHED", table)
  with caplog.at_level("INFO"):
    model = train_step.init_model(_config(pretrained="imagenet"))
  np.testing.assert_array_equal(np.asarray(model.conv1.kernel[...]),
                                sd["conv1.weight"].transpose(2, 3, 1, 0))
  assert "backbone weights read from " + str(cache / "small.npz") in caplog.text
  caplog.clear()
  with caplog.at_level("INFO"):
    train_step.init_model(_config(pretrained="none"))
  assert "starts from random weights" in caplog.text
  # A bad download stops init_model with one ConfigError line (the run trains nothing).
  monkeypatch.setenv(weights_cache.URL_ENV, _refused_url())
  (cache / "small.npz").unlink()
  with pytest.raises(run_config.ConfigError) as error:
    train_step.init_model(_config(pretrained="imagenet"))
  assert str(error.value).startswith("config.pretrained=imagenet: cannot download ")
  assert "\n" not in str(error.value) and os.listdir(cache) == []


@pytest.mark.slow
def test_a_resumed_run_reads_no_published_weights(tiny_run, tmp_path, monkeypatch):
  """A run with checkpoints takes its weights from them: nothing is fetched (or read) again,
  so a resume works offline; a workdir without a good checkpoint reads them."""
  import shutil  # pylint: disable=import-outside-toplevel

  from hn_jax import train, train_step  # pylint: disable=import-outside-toplevel
  from hn_jax.testing import runs  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "run"
  shutil.copytree(tiny_run[0], workdir)
  asked = []
  init_state = train_step.init_state

  def recording(config, *args, read_weights=True, **kwargs):
    asked.append(read_weights)
    return init_state(config, *args, read_weights=read_weights, **kwargs)

  monkeypatch.setattr(train_step, "init_state", recording)
  assert train.train_and_evaluate(runs.tiny_config(), str(workdir)) == {}  # finished: nothing
  assert asked == [False]

