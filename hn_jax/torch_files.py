"""Reads files written by `torch.save` (state dicts of tensors) into NumPy, without PyTorch.

`load(path)` returns what the file holds with every tensor as a NumPy array in torch's layout
(same shape, same element order, same dtype; bfloat16 and float8 as `ml_dtypes` types):
dicts and OrderedDicts (nested ones too, as DINO's checkpoints), lists, tuples, sets and plain
values (int, float, complex, str, bytes, bool, None).

No code from the file runs. `torch.save` writes a pickle, and a pickle may name any importable
callable (`os.system`, ...) and call it. Here the unpickler resolves a name only from a fixed
allowlist, `ALLOWED_GLOBALS`: `collections.OrderedDict`; the plain-data constructors pickle
protocol 2 writes (`builtins.set`, `frozenset`, `complex`; `_codecs.encode` for bytes, latin-1
only); torch's tensor rebuilders (`torch._utils._rebuild_tensor{,_v2,_v3}`,
`_rebuild_parameter{,_with_state}`) mapped to NumPy builders written here; and inert markers
for torch's storage types and dtypes. Any other name raises `TorchFileError` naming it,
before anything is called. The markers and builders refuse attribute writes, so a pickle's
BUILD opcode cannot alter them either.

The two layouts `torch.save` writes (facts from torch/serialization.py):

* zip (PyTorch >= 1.6, the default): an uncompressed zip whose entries share one top folder
  `<prefix>/`: `data.pkl` (the pickled object), `data/<key>` (each storage's raw bytes),
  `byteorder` ("little" or "big"; absent means little) and version records. A storage is a
  pickle persistent id `("storage", storage_type, key, location, numel)`.
* legacy (`_use_new_zipfile_serialization=False`, and older torchvision files): a stream of
  pickles: the magic number 0x1950a86a20f9469cfc6c, the protocol version 1001, a sys_info
  dict, the object (persistent ids `("storage", storage_type, key, location, numel,
  view_metadata)`), the sorted list of storage keys; then, for each key in that order, an
  int64 little-endian element count followed by the storage's bytes (little-endian).

A tensor is `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
backward_hooks[, metadata])`: the elements `storage[offset + sum(i_k * stride_k)]`, read here
with `numpy.lib.stride_tricks.as_strided` after checking that every index lies inside the
storage, then copied to a C-contiguous array (views sharing a storage become separate arrays).
PyTorch's oldest format (a tar archive, before 0.4) is not read.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import struct
import sys
import zipfile
from typing import Any, Callable, NamedTuple

import ml_dtypes
import numpy as np

__all__ = ["ALLOWED_GLOBALS", "TorchFileError", "load", "load_state_dict"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


class TorchFileError(ValueError):
  """A file that is not a readable torch.save state dict; the message is one line."""


# ---------------------------------------------------------------------------------------------
# What a pickle may name.

# torch's dtype names (torch.<name>) -> NumPy dtype. Aliases (torch.float == torch.float32)
# pickle under their canonical name; both are listed.
_DTYPES: dict[str, Any] = {
    "float64": np.float64, "double": np.float64,
    "float32": np.float32, "float": np.float32,
    "float16": np.float16, "half": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "complex128": np.complex128, "cdouble": np.complex128,
    "complex64": np.complex64, "cfloat": np.complex64,
    "int64": np.int64, "long": np.int64,
    "int32": np.int32, "int": np.int32,
    "int16": np.int16, "short": np.int16,
    "int8": np.int8,
    "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    "bool": np.bool_,
}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
              "float8_e8m0fnu"):
  if hasattr(ml_dtypes, _name):
    _DTYPES[_name] = getattr(ml_dtypes, _name)

# torch's legacy typed storage classes (torch.<Name>Storage) -> dtype name.
_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool",
}


class _Frozen:
  """Base of the objects a pickle can reach by name: no attribute can be set or deleted."""

  __slots__ = ()

  def __setattr__(self, name: str, value: Any) -> None:
    raise TorchFileError(f"the pickle tries to set attribute {name!r} of {self!r}")

  def __delattr__(self, name: str) -> None:
    raise TorchFileError(f"the pickle tries to delete attribute {name!r} of {self!r}")


class _TorchName(_Frozen):
  """A torch global the pickle may name, standing for a NumPy dtype."""

  __slots__ = ("name", "dtype")

  def __init__(self, name: str, dtype: np.dtype):
    object.__setattr__(self, "name", name)
    object.__setattr__(self, "dtype", np.dtype(dtype))

  def __repr__(self) -> str:
    return f"torch.{self.name}"


class _StorageType(_TorchName):
  """Marker for torch.<X>Storage / torch.UntypedStorage in a persistent id."""

  __slots__ = ()


class _DType(_TorchName):
  """Marker for a torch dtype object (torch.float32, ...)."""

  __slots__ = ()


class _Builder(_Frozen):
  """A rebuild function a pickle may call (REDUCE), standing in for torch's."""

  __slots__ = ("name", "fn")

  def __init__(self, name: str, fn: Callable[..., Any]):
    object.__setattr__(self, "name", name)
    object.__setattr__(self, "fn", fn)

  def __call__(self, *args: Any) -> Any:
    return self.fn(*args)

  def __repr__(self) -> str:
    return self.name


class _Storage(NamedTuple):
  """A storage named by a persistent id; its bytes live in `_Reader.storages[key]`."""

  key: str
  dtype: np.dtype
  numel: int


class _Tensor(NamedTuple):
  """A tensor to cut from a storage once every storage's bytes are known."""

  storage: _Storage
  dtype: np.dtype
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]
  conj: bool
  neg: bool


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(
      type(v) is int for v in value):  # pylint: disable=unidiomatic-typecheck; no bool
    raise TorchFileError(f"a tensor's {what} is {value!r}, not a tuple of ints")
  return tuple(value)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *,
                    dtype: np.dtype | None = None, metadata: Any = None) -> _Tensor:
  if not isinstance(storage, _Storage):
    raise TorchFileError(f"a tensor's storage is a {type(storage).__name__}, not a storage")
  if type(offset) is not int or offset < 0:  # pylint: disable=unidiomatic-typecheck
    raise TorchFileError(f"a tensor's storage offset is {offset!r}")
  size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
  if len(size) != len(stride) or any(s < 0 for s in size + stride):
    raise TorchFileError(f"a tensor has size {size} and stride {stride}")
  metadata = metadata or {}
  if not isinstance(metadata, dict):
    raise TorchFileError(f"a tensor's metadata is a {type(metadata).__name__}, not a dict")
  return _Tensor(storage, storage.dtype if dtype is None else dtype, offset, size, stride,
                 bool(metadata.get("conj", False)), bool(metadata.get("neg", False)))


def _rebuild_tensor_v1(storage, offset, size, stride):
  return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None,
                       metadata=None):
  del requires_grad, hooks
  return _rebuild_tensor(storage, offset, size, stride, metadata=metadata)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype,
                       metadata=None):
  del requires_grad, hooks
  if not isinstance(dtype, _DType):
    raise TorchFileError(f"a tensor's dtype is {dtype!r}, not a torch dtype")
  return _rebuild_tensor(storage, offset, size, stride, dtype=dtype.dtype, metadata=metadata)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
  del requires_grad, hooks, state  # (state: a Parameter's Python attributes, dropped)
  if not isinstance(data, _Tensor):
    raise TorchFileError(f"a parameter holds a {type(data).__name__}, not a tensor")
  return data


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
  """`_codecs.encode` as pickle protocol 2 uses it to write bytes: latin-1 only."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise TorchFileError(f"_codecs.encode called with a {type(text).__name__} and "
                         f"{str(encoding)[:20]!r}, not as pickle writes bytes")
  return text.encode("latin-1")


def _allowed_globals() -> dict[str, Any]:
  allowed: dict[str, Any] = {"collections.OrderedDict": collections.OrderedDict}
  # Plain data as pickle protocol 2 writes it (bytes go through _codecs.encode).
  allowed["_codecs.encode"] = _Builder("_codecs.encode", _encode)
  for kind in (set, frozenset, complex):
    allowed[f"builtins.{kind.__name__}"] = _Builder(f"builtins.{kind.__name__}", kind)
  for name, fn in (("_rebuild_tensor", _rebuild_tensor_v1),
                   ("_rebuild_tensor_v2", _rebuild_tensor_v2),
                   ("_rebuild_tensor_v3", _rebuild_tensor_v3),
                   ("_rebuild_parameter", _rebuild_parameter),
                   ("_rebuild_parameter_with_state", _rebuild_parameter)):
    allowed[f"torch._utils.{name}"] = _Builder(f"torch._utils.{name}", fn)
  for name, dtype_name in _STORAGE_DTYPES.items():
    marker = _StorageType(name, _DTYPES[dtype_name])
    allowed[f"torch.{name}"] = marker
    allowed[f"torch.cuda.{name}"] = marker  # old checkpoints saved from the GPU
  for module in ("torch", "torch.storage"):
    allowed[f"{module}.UntypedStorage"] = _StorageType("UntypedStorage", np.uint8)
  for name, dtype in _DTYPES.items():
    allowed[f"torch.{name}"] = _DType(name, dtype)
  return allowed


# "module.name" -> what the pickle gets instead of importing it.
ALLOWED_GLOBALS: dict[str, Any] = _allowed_globals()


# ---------------------------------------------------------------------------------------------
# The unpickler.


class _Unpickler(pickle.Unpickler):
  """Resolves names from ALLOWED_GLOBALS only; storages become `_Storage` placeholders."""

  def __init__(self, file: io.BytesIO, legacy: bool, path: str):
    super().__init__(file, encoding="utf-8")
    self._legacy = legacy
    self._path = path
    self.storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _compat_pickle.NAME_MAPPING:  # protocol 2 writes Python 2's names
      module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    full = f"{module}.{name}"
    if full in ALLOWED_GLOBALS:
      return ALLOWED_GLOBALS[full]
    if module in ("torch", "torch.cuda") and name.startswith("Q") and name.endswith("Storage"):
      raise TorchFileError(f"{self._path}: holds quantized tensors ({full}), which are not "
                           "supported; save a float state dict instead")
    raise TorchFileError(
        f"{self._path}: refused to load: its pickle references the global {full!r}, which a "
        "state dict of tensors never needs (only tensors, storages, dtypes and OrderedDict are "
        "allowed); nothing was executed. Do not load this file with torch.load either")

  def persistent_load(self, pid: Any) -> _Storage:
    n = 6 if self._legacy else 5
    if not isinstance(pid, tuple) or len(pid) != n or pid[0] not in ("storage", b"storage"):
      raise TorchFileError(f"{self._path}: unexpected persistent id {str(pid)[:80]!r}, not a "
                           "storage")
    storage_type, key, _, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType):
      raise TorchFileError(f"{self._path}: a storage's type is {storage_type!r}")
    if isinstance(key, bytes):
      key = key.decode("ascii")
    if not isinstance(key, str) or isinstance(numel, bool) or not isinstance(numel, int) \
        or numel < 0:
      raise TorchFileError(f"{self._path}: a storage has key {key!r} and size {numel!r}")
    if self._legacy and pid[5] is not None:
      raise TorchFileError(f"{self._path}: holds a storage view (PyTorch < 1.0?), which is "
                           "not supported")
    storage = _Storage(key, storage_type.dtype, numel)
    known = self.storages.setdefault(key, storage)
    if known.dtype != storage.dtype or known.numel != storage.numel:
      raise TorchFileError(f"{self._path}: storage {key!r} is declared twice differently")
    return known


def _unpickle(stream: io.BytesIO, legacy: bool, path: str) -> tuple[Any, dict[str, _Storage]]:
  """The next pickle of `stream` (left just after it) and the storages it names."""
  unpickler = _Unpickler(stream, legacy, path)
  try:
    obj = unpickler.load()
  except TorchFileError:
    raise
  except Exception as e:  # pylint: disable=broad-except; the pickle module fails many ways
    raise TorchFileError(f"{path}: the pickle cannot be read ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:120]}); is the file complete?") from None
  return obj, unpickler.storages


# ---------------------------------------------------------------------------------------------
# Tensors.


def _to_array(t: _Tensor, raw: bytes | memoryview, little: bool, path: str) -> np.ndarray:
  dtype = np.dtype(t.dtype)
  item = dtype.itemsize
  nbytes = len(raw)
  if nbytes % item:
    raise TorchFileError(f"{path}: storage {t.storage.key!r} holds {nbytes} bytes, not a "
                         f"multiple of {dtype.name}'s {item}")
  storage = np.frombuffer(raw, dtype=dtype)
  if item > 1 and little != (sys.byteorder == "little"):
    storage = storage.byteswap()  # (complex: each part on its own)
  if 0 in t.size:
    array = np.zeros(t.size, dtype)
  elif np.prod(t.size, dtype=object) > storage.size:
    raise TorchFileError(f"{path}: a tensor of size {t.size} has more elements than its "
                         f"storage {t.storage.key!r} ({storage.size}): a broadcast view, "
                         "which a state dict does not hold")
  else:
    last = t.offset + sum((s - 1) * st for s, st in zip(t.size, t.stride))
    if last >= storage.size:
      raise TorchFileError(f"{path}: a tensor of size {t.size}, stride {t.stride} and offset "
                           f"{t.offset} reaches past its storage {t.storage.key!r} of "
                           f"{storage.size} elements; is the file complete?")
    array = np.lib.stride_tricks.as_strided(
        storage[t.offset:], shape=t.size, strides=[s * item for s in t.stride],
        writeable=False)
    array = np.array(array, dtype=dtype, order="C")
  if dtype.kind == "b" and array.size and array.view(np.uint8).max() > 1:
    array = array.view(np.uint8) != 0
  if t.conj:
    array = np.conj(array)
  if t.neg:
    array = np.negative(array)
  return array


def _resolve(obj: Any, arrays: Callable[[_Tensor], np.ndarray]) -> Any:
  """`obj` with every `_Tensor` replaced by its array; containers rebuilt, other leaves kept."""
  done: dict[int, Any] = {}

  def walk(x: Any) -> Any:
    if id(x) in done:
      return done[id(x)]
    if isinstance(x, _Tensor):
      out = arrays(x)
    elif isinstance(x, _Storage):
      raise TorchFileError("the file holds a bare storage, not only tensors")
    elif isinstance(x, (dict, collections.OrderedDict)):
      out = type(x)((walk(k), walk(v)) for k, v in x.items())
    elif isinstance(x, list):
      out = [walk(v) for v in x]
    elif isinstance(x, tuple):
      out = tuple(walk(v) for v in x)
    elif isinstance(x, (set, frozenset)):
      out = type(x)(walk(v) for v in x)
    elif x is None or isinstance(x, (bool, int, float, complex, str, bytes, bytearray)):
      out = x
    else:  # a marker or builder itself, left bare by the pickle
      raise TorchFileError(f"the file holds {x!r} outside a tensor")
    done[id(x)] = out
    return out

  try:
    return walk(obj)
  except RecursionError:
    raise TorchFileError("the file's objects are nested too deeply") from None
  except TypeError as e:  # e.g. a tensor used as a dict key or a set member
    raise TorchFileError(f"the file holds objects a state dict never has ({e})") from None


# ---------------------------------------------------------------------------------------------
# The two layouts.


def _load_zip(path: str) -> Any:
  try:
    archive = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise TorchFileError(f"{path}: a zip archive that cannot be opened ({e}); is it complete? "
                         "Download or save it again") from None
  with archive:
    names = archive.namelist()
    pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
      if any(n.endswith("constants.pkl") for n in names):
        raise TorchFileError(f"{path}: a TorchScript archive (torch.jit.save), not a state "
                             "dict saved with torch.save")
      raise TorchFileError(f"{path}: a zip archive but not one written by torch.save (no "
                           "single <folder>/data.pkl entry)")
    prefix = pickles[0][:-len("data.pkl")]

    def record(name: str) -> bytes:
      try:
        return archive.read(prefix + name)
      except KeyError:
        raise TorchFileError(f"{path}: the entry {prefix + name!r} is missing; is the file "
                             "complete?") from None
      except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise TorchFileError(f"{path}: the entry {prefix + name!r} cannot be read ({e}); is "
                             "the file complete?") from None

    little = True
    if prefix + "byteorder" in names:
      order = record("byteorder")
      if order not in (b"little", b"big"):
        raise TorchFileError(f"{path}: unknown byte order {order[:20]!r}")
      little = order == b"little"
    obj, storages = _unpickle(io.BytesIO(record("data.pkl")), False, path)
    raw: dict[str, memoryview] = {}
    for key, storage in storages.items():
      data = record(f"data/{key}")
      need = storage.numel * storage.dtype.itemsize
      if len(data) < need:
        raise TorchFileError(f"{path}: storage {key!r} holds {len(data)} bytes, {need} "
                             "expected; is the file complete?")
      raw[key] = memoryview(data)[:need]
  return _resolve(obj, lambda t: _to_array(t, raw[t.storage.key], little, path))


def _load_legacy(path: str, data: bytes) -> Any:
  stream = io.BytesIO(data)  # (shares `data`, no copy)
  # The magic number, the protocol version and sys_info: three small pickles.
  for want, what in ((LEGACY_MAGIC, "magic number"), (LEGACY_PROTOCOL, "protocol version"),
                     (dict, "sys_info")):
    value, _ = _unpickle(stream, True, path)
    if not (isinstance(value, dict) if want is dict else  # pylint: disable=unidiomatic-typecheck
            type(value) is int and value == want):
      raise TorchFileError(f"{path}: not a file written by torch.save (bad {what}: "
                           f"{str(value)[:40]!r})")
  obj, storages = _unpickle(stream, True, path)
  keys, _ = _unpickle(stream, True, path)
  if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(storages):
    raise TorchFileError(f"{path}: its storage list does not match the storages it uses; is "
                         "the file complete?")
  raw: dict[str, memoryview] = {}
  pos, view = stream.tell(), memoryview(data)
  for key in keys:
    key = str(key)
    if pos + 8 > len(data):
      raise TorchFileError(f"{path}: ends before storage {key!r}; is the file complete?")
    (numel,) = struct.unpack_from("<q", data, pos)
    storage = storages[key]
    if numel != storage.numel:
      raise TorchFileError(f"{path}: storage {key!r} holds {numel} elements, "
                           f"{storage.numel} declared; is the file intact?")
    nbytes = numel * storage.dtype.itemsize
    pos += 8
    if pos + nbytes > len(data):
      raise TorchFileError(f"{path}: ends inside storage {key!r} ({len(data) - pos} of "
                           f"{nbytes} bytes); is the file complete?")
    raw[key] = view[pos:pos + nbytes]
    pos += nbytes
  # Legacy storages are written little-endian whatever the machine (torch's _write_file).
  return _resolve(obj, lambda t: _to_array(t, raw[t.storage.key], True, path))


def load(path: str | os.PathLike[str]) -> Any:
  """What `torch.save` wrote to `path`, tensors as NumPy arrays; no code from the file runs.

  Raises `TorchFileError` (one line naming the file) for anything else: a pickle naming a
  global outside `ALLOWED_GLOBALS`, a truncated or foreign file.
  """
  path = os.fspath(path)
  try:
    return _load(path)
  except TorchFileError as e:
    if str(e).startswith(f"{path}: "):
      raise
    raise TorchFileError(f"{path}: {e}") from None


def _load(path: str) -> Any:
  with open(path, "rb") as f:
    if f.read(2) == b"PK":
      data = None
    else:
      f.seek(0)
      data = f.read()
  if data is None:
    return _load_zip(path)
  if data[257:262] == b"ustar":
    raise TorchFileError(f"{path}: a tar archive (PyTorch < 0.4), which is not read; load "
                         "and save it again with a recent PyTorch")
  if not data.startswith(b"\x80"):
    raise TorchFileError(f"{path}: not a file written by torch.save (neither a zip archive "
                         "nor a pickle)")
  return _load_legacy(path, data)


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """A flat state dict (names to arrays, torch's layout) read by `load`; anything else in the
  file (a nested dict, a number) raises `TorchFileError` naming the entry."""
  path = os.fspath(path)
  obj = load(path)
  if not isinstance(obj, dict):
    raise TorchFileError(f"{path}: holds a {type(obj).__name__}, not a state dict (a mapping "
                         "of names to tensors)")
  out = {}
  for key, value in obj.items():
    if not isinstance(value, np.ndarray):
      hint = (f" (a nested dict: its keys are {', '.join(map(repr, list(value)[:4]))}...)"
              if isinstance(value, dict) else "")
      raise TorchFileError(f"{path}: entry {key!r} is a {type(value).__name__}, not a "
                           f"tensor{hint}")
    out[str(key)] = value
  return out
