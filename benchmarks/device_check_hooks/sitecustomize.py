"""Records imports of TensorFlow, TFDS and CLU in every Python process of device_check.sh.

The device machine has none of them, so nothing the check runs may need them. With this
folder on PYTHONPATH, each attempt to import one of them (found or not) is appended as a
JSON line to $HN_FORBIDDEN_IMPORTS_LOG: the module, the file and line that imported it, the
process's command line, and whether the import found the module. Nothing is blocked: where a
module is installed (a development machine) the import goes through and is reported, which
is what the check is for. Another sitecustomize module further along sys.path (a
distribution's own) is still run.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys

FORBIDDEN = ("tensorflow", "tensorflow_datasets", "clu")
_LOG = os.environ.get("HN_FORBIDDEN_IMPORTS_LOG", "")


def _importer() -> str:
  """file:line of the innermost frame outside importlib and this file."""
  frame = sys._getframe(2)  # pylint: disable=protected-access
  while frame is not None:
    name = frame.f_code.co_filename
    if not (name.startswith("<frozen") or "importlib" in name or name == __file__):
      return f"{name}:{frame.f_lineno}"
    frame = frame.f_back
  return "?"


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
      record = dict(module=fullname, found=found, importer=_importer(), pid=os.getpid(),
                    argv=list(getattr(sys, "argv", []))[:4])
      with open(_LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    except Exception:  # pylint: disable=broad-except
      pass  # recording must never break the program
    finally:
      self._busy = False
    return None


if _LOG:
  sys.meta_path.insert(0, _Recorder())

# Run the sitecustomize this one shadows, if any.
_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or os.curdir) != _here])
if _spec is not None and _spec.loader is not None:
  _module = importlib.util.module_from_spec(_spec)
  _spec.loader.exec_module(_module)
