"""Published backbone weights by name: `config.pretrained="imagenet"` (or "dino" for the ViTs).

`resolve(config.pretrained, config.model)` turns the setting into a file for
`hn_jax.pretrained`: "" or "none" gives None (random init); a name of `NAMES` gives the file
in the cache folder, downloaded the first time; anything else is a path, returned as it is.

The cache folder is `$XDG_CACHE_HOME/hn_jax/weights` (default `~/.cache/hn_jax/weights`),
created private (0700). A download goes to a temporary file in that folder, is checked
(length against Content-Length, SHA-256 against `PUBLISHED`), then renamed into place at
once: a file under its final name is always complete, and a failed download leaves nothing.
A file already in the cache (downloaded, or placed there by hand) is checked against the
same SHA-256 each time it is used (about 0.3 s per 100 MB).

`HN_JAX_WEIGHTS_URL` replaces the download location: a mirror (or a test's server) holds the
files under their cache names, `$HN_JAX_WEIGHTS_URL/<file>`.

The checksums. torchvision names its files with the first 8 hex digits of their SHA-256
(`resnet50-0676ba61.pth`); the full digests below are not computed here (this code was
written without network access) but copied from several independent public records of the
downloaded files, each of which agrees with torchvision's prefix. timm's Hugging Face files
and DINO's files publish no checksum in their names and hn_jax records none (`sha256=""`):
they are checked for length only, and the digest of what arrived is logged so that it can be
compared with the one Hugging Face shows on the file's page. An entry may also hold only a
prefix of the digest (at least 8 hex digits): the file's digest must then start with it.

Only the standard library is used (urllib), and nothing is downloaded unless a name is asked
for: the tests and the embedded configs (digits, synthetic) never touch the network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request

from absl import logging

URL_ENV = "HN_JAX_WEIGHTS_URL"
RANDOM = ("", "none")  # config.pretrained values meaning random initialisation
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Published:
  """A published weights file: where it is, its name in the cache and its checksum."""

  url: str
  filename: str  # its name in the cache folder (and on a mirror)
  sha256: str  # full hex digest, a prefix of it (>= 8 hex digits), or "" when unknown
  what: str  # one line: whose weights, trained on what


_TORCHVISION = "https://download.pytorch.org/models/"
_HF = "https://huggingface.co/timm/{}/resolve/main/model.safetensors"
_DINO = "https://dl.fbaipublicfiles.com/dino/{0}/{0}.pth"

# (name, config.model) -> the file. torchvision's IMAGENET1K_V1 weights (what
# `pretrained=True` gave when the paper's PyTorch release was written); timm's default ImageNet
# weights of each ViT (AugReg, ImageNet-21k then fine-tuned on ImageNet-1k: trained with
# mean = std = 0.5); DINO's self-supervised ViTs (ImageNet-1k without labels).
PUBLISHED: dict[tuple[str, str], Published] = {
    ("imagenet", "resnet18"): Published(
        _TORCHVISION + "resnet18-f37072fd.pth", "resnet18-f37072fd.pth",
        "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec",
        "torchvision ResNet18, IMAGENET1K_V1"),
    ("imagenet", "resnet50"): Published(
        _TORCHVISION + "resnet50-0676ba61.pth", "resnet50-0676ba61.pth",
        "0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a",
        "torchvision ResNet50, IMAGENET1K_V1"),
    ("imagenet", "googlenet"): Published(
        _TORCHVISION + "googlenet-1378be20.pth", "googlenet-1378be20.pth",
        "1378be20a8e875cf1568b8a71654e704449655e34711a959a38b04fb34905cef",
        "torchvision GoogLeNet, IMAGENET1K_V1"),
    ("imagenet", "vit_small_patch16"): Published(
        _HF.format("vit_small_patch16_224.augreg_in21k_ft_in1k"),
        "vit_small_patch16_224.augreg_in21k_ft_in1k.safetensors", "",
        "timm vit_small_patch16_224.augreg_in21k_ft_in1k"),
    ("imagenet", "vit_base_patch16"): Published(
        _HF.format("vit_base_patch16_224.augreg2_in21k_ft_in1k"),
        "vit_base_patch16_224.augreg2_in21k_ft_in1k.safetensors", "",
        "timm vit_base_patch16_224.augreg2_in21k_ft_in1k"),
    ("dino", "vit_small_patch16"): Published(
        _DINO.format("dino_deitsmall16_pretrain"), "dino_deitsmall16_pretrain.pth", "",
        "DINO ViT-S/16 (self-supervised on ImageNet-1k)"),
    ("dino", "vit_base_patch16"): Published(
        _DINO.format("dino_vitbase16_pretrain"), "dino_vitbase16_pretrain.pth", "",
        "DINO ViT-B/16 (self-supervised on ImageNet-1k)"),
}
NAMES = ("imagenet", "dino")


class WeightsDownloadError(ValueError):
  """Published weights that could not be obtained; one line: the URL, the file, the fix."""


def is_name(pretrained: str) -> bool:
  """Whether `pretrained` names published weights (rather than a path or random init)."""
  return pretrained in NAMES


def models_with(name: str) -> list[str]:
  """The models that have published weights called `name`."""
  return [model for (n, model) in PUBLISHED if n == name]


def cache_dir() -> str:
  """`$XDG_CACHE_HOME/hn_jax/weights`, default `~/.cache/hn_jax/weights`."""
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "hn_jax", "weights")


def entry(name: str, model: str) -> Published:
  """The published file of `name` for `model`; KeyError naming the models that have one."""
  try:
    return PUBLISHED[(name, model)]
  except KeyError:
    raise KeyError(f"no published {name!r} weights for model {model!r}; {name!r} exists for "
                   f"{', '.join(models_with(name)) or 'no model'}") from None


def url_of(published: Published) -> str:
  """Its download URL: the publisher's, or `$HN_JAX_WEIGHTS_URL/<cache name>`."""
  base = os.environ.get(URL_ENV, "")
  return f"{base.rstrip('/')}/{published.filename}" if base else published.url


def _digest(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def _matches(digest: str, expected: str) -> bool:
  return not expected or digest.startswith(expected.lower())


def _fix(published: Published, path: str) -> str:
  return (f"download {published.url} on a machine with network access and place it as {path}, "
          "or pass --config.pretrained=PATH (a copy of the file)")


def _ensure_folder(folder: str) -> None:
  if not os.path.isdir(folder):
    os.makedirs(folder, mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)  # makedirs' mode is masked by the umask


def _download(url: str, folder: str, expected: str, timeout: float) -> tuple[str, str]:
  """(temporary file, its sha256) of `url` fetched into `folder`; removed on any failure."""
  fd, tmp = tempfile.mkstemp(prefix=".download-", suffix=".part", dir=folder)
  try:
    h = hashlib.sha256()
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
      length = response.headers.get("Content-Length")
      got = 0
      while chunk := response.read(_CHUNK):
        out.write(chunk)
        h.update(chunk)
        got += len(chunk)
    if length is not None and got != int(length):
      raise WeightsDownloadError(f"truncated: {got} of {length} bytes arrived")
    digest = h.hexdigest()
    if not _matches(digest, expected):
      raise WeightsDownloadError(f"its sha256 is {digest}, not the published {expected}")
    return tmp, digest
  except BaseException:
    os.unlink(tmp)
    raise


def fetch(name: str, model: str, *, folder: str | None = None, timeout: float = 60.0) -> str:
  """The path of `name`'s weights for `model` in the cache, downloaded and checked the first
  time; WeightsDownloadError (one line) when they cannot be had."""
  published = entry(name, model)
  folder = folder or cache_dir()
  path = os.path.join(folder, published.filename)
  url = url_of(published)
  if os.path.isfile(path):
    if published.sha256:
      digest = _digest(path)
      if not _matches(digest, published.sha256):
        raise WeightsDownloadError(
            f"{path}: its sha256 is {digest}, not the published {published.sha256} (damaged or "
            f"another file); delete it to download it again from {url}")
    return path
  try:
    _ensure_folder(folder)
  except OSError as e:
    raise WeightsDownloadError(f"cannot create the weights cache {folder} ({e.strerror or e}); "
                               f"set XDG_CACHE_HOME to a writable folder, or "
                               f"{_fix(published, path)}") from None
  logging.info("config.pretrained=%r: downloading %s (%s) into %s", name, url, published.what,
               path)
  try:
    tmp, digest = _download(url, folder, published.sha256, timeout)
  except WeightsDownloadError as e:
    raise WeightsDownloadError(f"bad download of {url} ({e}); {_fix(published, path)}"
                               ) from None
  except urllib.error.HTTPError as e:
    raise WeightsDownloadError(f"cannot download {url} (HTTP {e.code} {e.reason}); "
                               f"{_fix(published, path)}") from None
  except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
    # offline, refused, timed out, cut off
    reason = getattr(e, "reason", None) or e
    raise WeightsDownloadError(f"cannot download {url} ({reason}); "
                               f"{_fix(published, path)}") from None
  try:
    os.replace(tmp, path)
  except OSError as e:
    os.unlink(tmp)
    raise WeightsDownloadError(f"cannot write {path} ({e.strerror or e}); "
                               f"{_fix(published, path)}") from None
  if not published.sha256:
    logging.info("%s: no published checksum is recorded for it; its sha256 is %s (compare "
                 "with the one its publisher shows)", path, digest)
  return path


def resolve(pretrained: str, model: str) -> str | None:
  """The weights file `config.pretrained` stands for: None (random init), the cached
  published file (downloaded the first time), or the path as given."""
  if pretrained in RANDOM:
    return None
  if is_name(pretrained):
    return fetch(pretrained, model)
  return pretrained
