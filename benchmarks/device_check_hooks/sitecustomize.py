"""Records imports of TensorFlow, TFDS and CLU in every Python process of device_check.sh.

The device machine has none of them, so nothing the check runs may need them. With this
folder on PYTHONPATH, each look-up of one of them is appended as a JSON line to
$HN_FORBIDDEN_IMPORTS_LOG: the module, the file and line that asked, the process's command
line, whether the module is installed, and the kind: "import" (an import statement), or
"probe" (`importlib.util.find_spec`, which libraries use to see whether TensorFlow is there:
etils.epath and torch._dynamo do). A process that ends normally with one of them loaded adds
a "loaded" line. Nothing is blocked: where a module is installed (a development machine) the
import goes through and is reported, which is what the check is for. Another sitecustomize
module further along sys.path (a distribution's own) is still run.
"""

import atexit
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys

FORBIDDEN = ("tensorflow", "tensorflow_datasets", "clu")
_LOG = os.environ.get("HN_FORBIDDEN_IMPORTS_LOG", "")


def _importer() -> tuple[str, str]:
  """(file:line of the innermost frame outside importlib and this file, "probe" or "import")."""
  frame = sys._getframe(2)  # pylint: disable=protected-access
  kind = "import"
  while frame is not None:
    name = frame.f_code.co_filename
    if frame.f_code.co_name == "find_spec" and (
        name == "<frozen importlib.util>" or name.endswith(os.path.join("importlib", "util.py"))):
      kind = "probe"
    if not (name.startswith("<frozen") or "importlib" in name or name == __file__):
      return f"{name}:{frame.f_lineno}", kind
    frame = frame.f_back
  return "?", kind


def _write(record: dict) -> None:
  record.update(pid=os.getpid(), argv=list(getattr(sys, "argv", []))[:4])
  with open(_LOG, "a", encoding="utf-8") as f:
    f.write(json.dumps(record) + "\n")


def _loaded_at_exit() -> None:
  loaded = sorted(m for m, mod in list(sys.modules.items())
                  if m.partition(".")[0] in FORBIDDEN and mod is not None and "." not in m)
  if loaded:
    _write(dict(kind="loaded", module=",".join(loaded), found=True, importer="-"))


class _Recorder(importlib.abc.MetaPathFinder):
  """Finds nothing itself; notes every top-level import of a forbidden module."""

  def __init__(self):
    self._busy = False

  def find_spec(self, fullname, path=None, target=None):
    if path is not None or fullname not in FORBIDDEN or self._busy:
      return None
    self._busy = True
    try:
      found = any(finder.find_spec(fullname, path) is not None
                  for finder in sys.meta_path if finder is not self
                  and hasattr(finder, "find_spec"))
      importer, kind = _importer()
      _write(dict(kind=kind, module=fullname, found=found, importer=importer))
    except Exception:  # pylint: disable=broad-except
      pass  # recording must never break the program
    finally:
      self._busy = False
    return None


if _LOG:
  sys.meta_path.insert(0, _Recorder())
  atexit.register(_loaded_at_exit)

# Run the sitecustomize this one shadows, if any.
_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or os.curdir) != _here])
if _spec is not None and _spec.loader is not None:
  _module = importlib.util.module_from_spec(_spec)
  _spec.loader.exec_module(_module)
