"""hn_jax.torch_files: torch.save files read without PyTorch, running no code from them.

Files are written here by torch.save (zip and legacy layouts) and read back with torch
blocked from import; the reference is torch.load(weights_only=True) of the same file. Hostile
files are pickles naming os.system / builtins.eval / subprocess.Popen in torch's layouts: they
must be refused, naming the global, and a marker file their payload would create must not
appear.
"""

from __future__ import annotations

import collections
import io
import pickle
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from hn_jax import pretrained, torch_files
from hn_jax.models import create_model
from hn_jax.tools import convert_weights

try:
  import torch
except ImportError:  # the hostile and broken files below need no torch
  torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="writes its files with torch.save")

FORMATS = ("zip", "legacy")


def _save(obj, path, fmt: str):
  assert torch is not None, "needs_torch is missing"
  torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip")
  return path


def _torch_load(path):
  return torch.load(path, map_location="cpu", weights_only=True)


def _as_numpy(tensor) -> np.ndarray:
  """torch tensor -> NumPy, bfloat16 / float8 through their bits into ml_dtypes' types."""
  tensor = tensor.detach()
  special = {torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
             torch.float8_e4m3fn: (torch.int8, ml_dtypes.float8_e4m3fn)}
  if tensor.dtype in special:
    bits, dtype = special[tensor.dtype]
    return tensor.contiguous().view(bits).numpy().view(dtype)
  return tensor.numpy()


def _assert_same(got, want):
  """got (torch_files.load) equals want (torch.load): structure, leaves, dtypes, bits."""
  if isinstance(want, torch.Tensor):
    ref = _as_numpy(want)
    assert isinstance(got, np.ndarray)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert got.flags.c_contiguous
    assert got.tobytes() == np.ascontiguousarray(ref).tobytes()  # bit for bit (NaN, -0.0)
  elif isinstance(want, dict):
    assert isinstance(got, dict) and list(got) == list(want)
    for key in want:
      _assert_same(got[key], want[key])
  else:
    assert type(got) is type(want) and got == want


def _tensors(new_dtypes: bool):
  """Random tensors of many dtypes and layouts; views share one storage."""
  g = torch.Generator().manual_seed(0)
  base = torch.randn(5, 7, generator=g)
  out = collections.OrderedDict(
      base=base,
      transposed=base.t(),  # non-contiguous, same storage
      window=base[1:4, 2:6],  # storage offset 9, strides (7, 1)
      strided=base[::2, ::3],
      row=base[3],  # 1-d view at an offset
      scalar=torch.tensor(-2.5),  # 0-d
      empty=torch.zeros(0, 4),
      float64=torch.randn(3, 2, dtype=torch.float64, generator=g),
      float16=torch.randn(4, generator=g).half(),
      bfloat16=torch.randn(2, 3, generator=g).bfloat16(),
      bfloat16_t=torch.randn(3, 2, generator=g).bfloat16().t(),
      int64=torch.randint(-2**40, 2**40, (6,), generator=g),
      int32=torch.randint(-1000, 1000, (2, 2), dtype=torch.int32, generator=g),
      int16=torch.tensor([-3, 0, 300], dtype=torch.int16),
      int8=torch.tensor([-128, 0, 127], dtype=torch.int8),
      uint8=torch.randint(0, 256, (3, 3), dtype=torch.uint8, generator=g),
      bool=torch.rand(7, generator=g) > 0.5,
      complex64=torch.randn(3, dtype=torch.complex64, generator=g),
      parameter=torch.nn.Parameter(torch.randn(2, 3, generator=g)),
  )
  if new_dtypes:  # saved as UntypedStorage + dtype (_rebuild_tensor_v3); zip layout only
    out["uint16"] = torch.tensor([0, 1, 65535], dtype=torch.int32).to(torch.uint16)
    out["float8"] = torch.randn(5, generator=g).to(torch.float8_e4m3fn)
  return out


@needs_torch
@pytest.mark.parametrize("fmt", FORMATS)
def test_tensors_of_every_kind_match_torch_load(fmt, tmp_path, monkeypatch):
  path = _save(_tensors(new_dtypes=fmt == "zip"), tmp_path / "t.pth", fmt)
  want = _torch_load(path)
  monkeypatch.setitem(sys.modules, "torch", None)
  got = torch_files.load(path)
  assert type(got) is collections.OrderedDict
  _assert_same(got, want)
  # Views of one storage come back as independent arrays.
  got["base"][0, 0] = 1e6
  assert got["transposed"][0, 0] != 1e6


@needs_torch
@pytest.mark.parametrize("fmt", FORMATS)
def test_nested_dicts_and_plain_values(fmt, tmp_path, monkeypatch):
  teacher = {"backbone.cls_token": torch.randn(1, 1, 4), "head.last.weight": torch.randn(3, 4)}
  obj = {"teacher": teacher, "student": {"w": teacher["head.last.weight"]}, "epoch": 3,
         "lr": 0.5, "arch": "vit_small", "note": None, "flags": [True, 2, "x"], "pair": (1, 2),
         "blob": b"\x00\xff", "tags": {"a", "b"}, "z": 1 + 2j}
  path = _save(obj, tmp_path / "dino.pth", fmt)
  want = _torch_load(path)
  monkeypatch.setitem(sys.modules, "torch", None)
  got = torch_files.load(path)
  assert got["epoch"] == 3 and got["lr"] == 0.5 and got["arch"] == "vit_small"
  assert got["note"] is None and got["flags"] == [True, 2, "x"] and got["pair"] == (1, 2)
  assert got["blob"] == b"\x00\xff" and got["tags"] == {"a", "b"} and got["z"] == 1 + 2j
  for key in ("epoch", "lr", "arch", "note", "flags", "pair", "blob", "tags", "z"):
    assert got[key] == want[key]
  _assert_same(got["teacher"], want["teacher"])
  _assert_same(got["student"], want["student"])
  with pytest.raises(torch_files.TorchFileError,
                     match=r"dino\.pth: entry 'teacher' is a dict, not a tensor \(a nested dict"):
    torch_files.load_state_dict(path)


def _conv_net():
  nn = torch.nn
  torch.manual_seed(0)
  net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Sequential(nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6)),
                      nn.Flatten(), nn.LazyLinear(2))
  net(torch.randn(2, 3, 6, 6))  # training-mode pass: running stats and counters move
  return net


@needs_torch
@pytest.mark.parametrize("fmt", FORMATS)
def test_module_state_dict(fmt, tmp_path, monkeypatch):
  path = _save(_conv_net().state_dict(), tmp_path / "net.pth", fmt)
  want = _torch_load(path)
  monkeypatch.setitem(sys.modules, "torch", None)
  got = torch_files.load_state_dict(path)
  assert got["1.num_batches_tracked"].dtype == np.int64 and got["1.num_batches_tracked"] == 1
  assert got["1.num_batches_tracked"].shape == ()
  _assert_same(got, dict(want))


# ---------------------------------------------------------------------------------------------
# Through hn_jax.pretrained.


@needs_torch
def test_resnet18_weights_through_load_torchvision_weights(tmp_path, monkeypatch):
  """A torchvision-keyed resnet18 state dict (hn_jax's own expected shapes, random values,
  float32 and bfloat16 entries) saved by torch.save, loaded with torch blocked."""
  # An abstract model (no initialisation: cheap) is filled with concrete arrays by the load.
  model = nnx.eval_shape(lambda: create_model("resnet18", 8, rngs=nnx.Rngs(0)))
  params, stats = nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat)
  rng = np.random.default_rng(0)
  sd = {k: rng.standard_normal(s).astype(np.float32)
        for k, s in pretrained.expected_torchvision_shapes(params, stats).items()}
  sd["fc.weight"], sd["fc.bias"] = np.zeros((1000, 512), np.float32), np.zeros(1000, np.float32)
  tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
  tensors["layer1.0.conv1.weight"] = tensors["layer1.0.conv1.weight"].bfloat16()
  tensors["layer2.0.bn1.num_batches_tracked"] = torch.tensor(7)
  for fmt in FORMATS:
    path = _save(tensors, tmp_path / f"resnet18-{fmt}.pth", fmt)
    with monkeypatch.context() as m:
      m.setitem(sys.modules, "torch", None)
      pretrained.load_torchvision_weights(model, path)
    np.testing.assert_array_equal(np.asarray(model.layer4[1].conv2.kernel[...]),
                                  sd["layer4.1.conv2.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(np.asarray(model.layer3[0].downsample.bn.mean[...]),
                                  sd["layer3.0.downsample.1.running_mean"])
    bf16 = tensors["layer1.0.conv1.weight"].float().numpy()  # exact in float32
    kernel = model.layer1[0].conv1.kernel
    assert kernel[...].dtype == np.float32
    np.testing.assert_array_equal(np.asarray(kernel[...]), bf16.transpose(2, 3, 1, 0))


@needs_torch
def test_convert_weights_reads_pth_without_torch(tmp_path, monkeypatch):
  sd = {"w": torch.randn(2, 3).bfloat16(), "b": torch.randn(3).double(), "n": torch.tensor(5)}
  path = _save(sd, tmp_path / "w.pth", "zip")
  monkeypatch.setitem(sys.modules, "torch", None)
  assert convert_weights.main([f"--input={path}", f"--output={tmp_path / 'w.npz'}"]) == 0
  with np.load(tmp_path / "w.npz") as f:
    assert f["w"].dtype == np.float32 and f["b"].dtype == np.float32 and f["n"].dtype == np.int64
    np.testing.assert_array_equal(f["w"], sd["w"].float().numpy())
    np.testing.assert_array_equal(f["b"], sd["b"].float().numpy())


# ---------------------------------------------------------------------------------------------
# Hostile and broken files.


class _Payload:
  """Pickles as a call of `func(*args)`: what a malicious checkpoint holds."""

  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args


def _payload(name: str, marker: str, inside: bool = False) -> bytes:
  """A pickle that creates `marker` when plain pickle loads it, through the global `name`;
  `inside`: as the last value of an OrderedDict that starts with an ordinary entry."""
  data = _bare_payload(name, marker)
  if inside:
    head = pickle.dumps(collections.OrderedDict([("conv.bias", 1.0)]), protocol=2)
    # The dict without STOP, then key "evil", the payload without PROTO and STOP, SETITEM.
    data = head[:-1] + b"X\x04\x00\x00\x00evil" + data[2:-1] + b"s."
  return data


def _bare_payload(name: str, marker: str) -> bytes:
  if name == "os.system":  # written by hand: pickle itself would name it posix.system
    command = f"touch {marker}".encode()
    return (b"\x80\x02cos\nsystem\nX" + len(command).to_bytes(4, "little") + command +
            b"\x85R.")
  if name == "builtins.eval":
    return pickle.dumps(_Payload(eval, f"open({marker!r}, 'w').close()"), protocol=2)
  assert name == "subprocess.Popen"
  # Popen returns at once; `check_call` would wait, but the point is the name Popen.
  return pickle.dumps(_Payload(subprocess.Popen, ["touch", marker]), protocol=2)


HOSTILE = ("os.system", "builtins.eval", "subprocess.Popen")


@pytest.mark.parametrize("name", HOSTILE)
@pytest.mark.parametrize("inside", [False, True])
def test_the_hostile_payloads_do_run_under_plain_pickle(name, inside, tmp_path):
  """The payloads below are real: plain pickle runs them (so a missing marker means something)."""
  marker = tmp_path / "ran"
  result = pickle.loads(_payload(name, str(marker), inside))  # nosec: the test's own payload
  if inside:
    assert list(result) == ["conv.bias", "evil"]
    result = result["evil"]
  if isinstance(result, subprocess.Popen):
    result.wait()
  assert marker.exists()


def _torch_zip(path, data_pkl: bytes, storages: dict[str, bytes] | None = None,
               byteorder: bytes | None = b"little"):
  """A zip laid out as torch.save's: archive/data.pkl, archive/data/<key>, byteorder."""
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr("archive/data.pkl", data_pkl)
    if byteorder is not None:
      z.writestr("archive/byteorder", byteorder)
    for key, raw in (storages or {}).items():
      z.writestr(f"archive/data/{key}", raw)
    z.writestr("archive/version", "3\n")
  return path


def _legacy(path, payload_pickle: bytes):
  with open(path, "wb") as f:
    for header in (torch_files.LEGACY_MAGIC, torch_files.LEGACY_PROTOCOL,
                   {"protocol_version": 1001, "little_endian": True}):
      pickle.dump(header, f, protocol=2)
    f.write(payload_pickle)
    pickle.dump([], f, protocol=2)
  return path


@pytest.mark.parametrize("name", HOSTILE)
@pytest.mark.parametrize("layout", ["zip", "legacy", "zip-inside-state-dict"])
def test_hostile_pickles_are_refused_and_run_nothing(name, layout, tmp_path):
  marker = tmp_path / "executed"
  data = _payload(name, str(marker), inside=layout == "zip-inside-state-dict")
  path = tmp_path / "evil.pth"
  if layout == "legacy":
    _legacy(path, data)
  else:
    _torch_zip(path, data)
  with pytest.raises(torch_files.TorchFileError) as error:
    torch_files.load(path)
  message = str(error.value)
  assert "\n" not in message and message.startswith(f"{path}: refused to load")
  assert f"the global '{name}'" in message and "nothing was executed" in message
  assert not marker.exists()
  # The same line through hn_jax.pretrained (no torch.load fallback).
  with pytest.raises(pretrained.WeightsFileError, match=f"refused to load.*'{name}'"):
    pretrained.read_state_dict(path)
  assert not marker.exists()


def test_pickle_cannot_alter_the_allowed_builders(tmp_path):
  """BUILD on an allowlisted builder (setting its attributes) fails; the builder is intact."""
  builder = torch_files.ALLOWED_GLOBALS["torch._utils._rebuild_tensor_v2"]
  # GLOBAL builder, {'fn': OrderedDict}, BUILD; then (None, {'fn': OrderedDict}) as slot state.
  for state in (b"}X\x02\x00\x00\x00fnccollections\nOrderedDict\ns",
                b"(N}X\x02\x00\x00\x00fnccollections\nOrderedDict\nst"):
    data = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n" + state + b"b."
    path = _torch_zip(tmp_path / "build.pth", data)
    with pytest.raises(torch_files.TorchFileError) as error:
      torch_files.load(path)
    assert "\n" not in str(error.value)
  assert builder.fn.__name__ == "_rebuild_tensor_v2"


@needs_torch
def test_big_endian_zip(tmp_path, monkeypatch):
  """A zip whose byteorder record says "big" holds byte-swapped storages."""
  sd = {"w": torch.randn(3, 4).t(), "i": torch.arange(-4, 4), "h": torch.randn(3).half(),
        "bf": torch.randn(2).bfloat16(), "c": torch.randn(2, dtype=torch.complex64),
        "u": torch.arange(5, dtype=torch.uint8)}
  path = _save(sd, tmp_path / "le.pth", "zip")
  monkeypatch.setitem(sys.modules, "torch", None)
  little = torch_files.load(path)
  with zipfile.ZipFile(path) as z:
    prefix = next(n for n in z.namelist() if n.endswith("/data.pkl"))[:-len("data.pkl")]
    data_pkl = z.read(prefix + "data.pkl")
    _, storages = torch_files._unpickle(  # pylint: disable=protected-access
        io.BytesIO(data_pkl), False, str(path))
    swapped = {}
    for key, storage in storages.items():
      raw = np.frombuffer(z.read(f"{prefix}data/{key}"), storage.dtype)
      swapped[key] = raw.byteswap().tobytes()
  big = torch_files.load(_torch_zip(tmp_path / "be.pth", data_pkl, swapped, b"big"))
  for key in sd:
    assert big[key].dtype == little[key].dtype
    assert big[key].tobytes() == little[key].tobytes()


def _zip_bytes(tmp_path) -> bytes:
  return _save({"w": torch.randn(64, 64)}, tmp_path / "ok.pth", "zip").read_bytes()


def _legacy_bytes(tmp_path) -> bytes:
  return _save({"w": torch.randn(64, 64)}, tmp_path / "ok_legacy.pth", "legacy").read_bytes()


@pytest.mark.parametrize("case, pattern", [
    ("zip_half", r"zip archive that cannot be opened"),
    ("zip_tail", r"zip archive that cannot be opened"),
    ("legacy_half", r"ends inside storage .*is the file complete\?"),
    ("legacy_pickle", r"the pickle cannot be read .*is the file complete\?"),
    ("foreign_zip", r"a zip archive but not one written by torch\.save"),
    ("random", r"not a file written by torch\.save"),
    ("empty", r"not a file written by torch\.save"),
    ("plain_pickle", r"not a file written by torch\.save \(bad magic"),
])
def test_broken_and_foreign_files_give_one_line(case, pattern, tmp_path, monkeypatch):
  if case.startswith(("zip", "legacy")):  # cut from a genuine file
    if torch is None:
      pytest.skip("writes its file with torch.save")
    whole = _zip_bytes(tmp_path) if case.startswith("zip") else _legacy_bytes(tmp_path)
    data = {"zip_half": whole[:len(whole) // 2], "zip_tail": whole[:-10],
            "legacy_half": whole[:len(whole) // 2], "legacy_pickle": whole[:60]}[case]
  elif case == "foreign_zip":
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
      z.writestr("hello/readme.txt", "hi")
    data = buffer.getvalue()
  elif case == "random":
    data = bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))
  elif case == "empty":
    data = b""
  else:
    data = pickle.dumps({"w": [1.0, 2.0]}, protocol=2)
  path = tmp_path / "broken.pth"
  path.write_bytes(data)
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(torch_files.TorchFileError, match=pattern) as error:
    torch_files.load(path)
  assert "\n" not in str(error.value) and str(error.value).startswith(f"{path}: ")
  with pytest.raises(pretrained.WeightsFileError, match=pattern):
    pretrained.read_state_dict(path)


@needs_torch
def test_inconsistent_storages_are_refused(tmp_path, monkeypatch):
  """A storage record shorter than declared; a broadcast (stride-0) view larger than its
  storage, which a state dict never holds and which could inflate a small file without bound."""
  path = _save({"w": torch.randn(4, 5)}, tmp_path / "w.pth", "zip")
  with zipfile.ZipFile(path) as z:
    entries = {n: z.read(n) for n in z.namelist()}
  prefix = next(n for n in entries if n.endswith("/data.pkl"))[:-len("data.pkl")]
  short = tmp_path / "short.pth"
  with zipfile.ZipFile(short, "w") as z:
    for name, raw in entries.items():
      z.writestr(name, raw[:-4] if name.startswith(prefix + "data/") else raw)
  broadcast = _save({"e": torch.randn(3).expand(1000, 3)}, tmp_path / "e.pth", "zip")
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(torch_files.TorchFileError, match=r"holds 76 bytes, 80 expected"):
    torch_files.load(short)
  with pytest.raises(torch_files.TorchFileError, match=r"more elements than its storage"):
    torch_files.load(broadcast)
