"""The one command-line path of every hn_jax command: absl flags, configs, one-line errors.

Each command (hn_jax.main and hn_jax/tools/*) defines its flags on its own `FlagValues`
(`command_flags()`, so that commands imported side by side, as in the tests, never clash)
and runs through `run`: `--help` prints the usage and exits 0, a mistake on the command line
(an unknown flag, a config file that does not exist or fails, a misspelt
`--config.SETTING`) is one line, `PROG: error: ...`, exit status 2, before anything heavy is
imported. A config file is given as `--config=FILE --config.KEY=VALUE` (ml_collections'
`config_flags`); libraries' INFO logs are hidden unless `--verbosity` is given.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import glob
import importlib.abc
import importlib.machinery
import logging as py_logging
import os
import re
import sys
import traceback
from typing import Callable, Sequence

from absl import flags, logging
from ml_collections import config_flags

from hn_jax import compile_cache

HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "--helpfull", "--helpxml", "-?")
# absl's logging flags, shared by every command (--verbosity=0 shows libraries' INFO lines).
_LOGGING_FLAGS = ("verbosity", "logtostderr", "alsologtostderr", "stderrthreshold",
                  "log_dir", "showprefixforinfo")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
SETTINGS_HINT = "every setting, its default and its meaning: docs/settings.md"


_CONFIG_DEFAULTS: dict[int, str | None] = {}  # id(FlagValues) -> its --config default


class UsageProblem(ValueError):
  """A mistake on the command line; the message is one line naming it and the fix."""


def command_flags() -> flags.FlagValues:
  """A command's own flags, with absl's logging flags (`--verbosity`, ...) and `--xla_cache`
  among them."""
  flag_values = flags.FlagValues()
  for name in _LOGGING_FLAGS:
    if name in flags.FLAGS:
      flag_values[name] = flags.FLAGS[name]
  flags.DEFINE_string(
      "xla_cache", None, "Folder of the persistent cache of compiled programs (default: "
      "$XDG_CACHE_HOME/hn_jax/xla, i.e. ~/.cache/hn_jax/xla; private to this user); `off`: "
      "no cache. JAX_COMPILATION_CACHE_DIR, when set, wins.", flag_values=flag_values)
  return flag_values


def define_config(flag_values: flags.FlagValues, default: str | None = None,
                  help_text: str = "A config file, e.g. configs/digits.py; " + SETTINGS_HINT
                  + ".") -> None:
  """`--config=FILE` and its `--config.KEY=VALUE` overrides on `flag_values`."""
  config_flags.DEFINE_config_file("config", default, help_text, flag_values=flag_values,
                                  lock_config=True)
  _CONFIG_DEFAULTS[id(flag_values)] = default


# Config settings that are open dicts: `--config.loss_params.margin=0.2` adds a key the file
# does not hold (ml_collections accepts overrides of existing keys only).
OPEN_SETTINGS = ("loss_params", "miner_params")


def _split_open_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str, str]]]:
  """argv without the `--config.OPEN.KEY=VALUE` overrides of OPEN_SETTINGS; those as
  (setting, key, value)."""
  rest, found = [], []
  pattern = r"^--?config\.({})\.([A-Za-z_][A-Za-z0-9_]*)(=(.*))?$".format(
      "|".join(OPEN_SETTINGS))
  for arg in argv:
    match = re.match(pattern, arg, re.DOTALL)
    if not match:
      rest.append(arg)
      continue
    if match.group(3) is None:
      raise UsageProblem(f"{arg}: give a value, e.g. {arg}=0.2")
    found.append((match.group(1), match.group(2), match.group(4)))
  return rest, found


def _literal(text: str) -> object:
  """`0.2` -> 0.2, `3` -> 3, `true` -> True, `(1, 2)` -> (1, 2); anything else: the text."""
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError, MemoryError, RecursionError):
    return text


def _apply_open_overrides(config, overrides: list[tuple[str, str, str]]) -> None:
  for setting, key, value in overrides:
    if setting not in config:
      raise UsageProblem(f"--config.{setting}.{key}: this config has no {setting} "
                         f"({SETTINGS_HINT})")
    group = config[setting]
    with group.unlocked():
      group[key] = _literal(value)


def wants_help(argv: Sequence[str]) -> bool:
  return any(a.split("=", 1)[0] in HELP_FLAGS for a in argv)


def _resolve_config_path(argv: list[str]) -> list[str]:
  """`--config=configs/X.py` given from another folder: the checkout's file of that name.

  In an editable install (the README's), `configs/` sits beside the package; a relative
  config path that does not exist here is looked up there, so that the README's commands work
  from any folder.
  """
  out = []
  for arg in argv:
    match = re.match(r"^(--?config=)([^:]+)(:.*)?$", arg)
    if match and not os.path.isabs(match.group(2)) and not os.path.exists(match.group(2)):
      beside = os.path.join(os.path.dirname(_PACKAGE_DIR), match.group(2))
      if os.path.isfile(beside):
        arg = f"{match.group(1)}{beside}{match.group(3) or ''}"
    out.append(arg)
  return out


def _config_path_problem(path: str) -> str:
  checkout = os.path.dirname(_PACKAGE_DIR)
  known = sorted({os.path.relpath(k, root) for root in (".", checkout)
                  for k in glob.glob(os.path.join(root, "configs", "*.py"))
                  if not k.endswith("__init__.py")})
  close = difflib.get_close_matches(path, known, n=1)
  hint = f"; did you mean {close[0]}?" if close else ""
  listed = f" The configs: {', '.join(known)}." if known else ""
  return f"--config={path}: no such file{hint}{listed}".rstrip()


def _override_problem(error: BaseException) -> str:
  """ml_collections' message for a bad `--config.KEY=VALUE`, as one line with the fix."""
  text = " ".join(str(error).replace("\\n", " ").split()).strip("'\"")
  key = re.match(r"'?([^'\s]+)'?", text)
  hint = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"\?', text)
  if hint:
    return (f"--config.{hint.group(2)}: no such setting; did you mean --config.{hint.group(1)}? "
            f"({SETTINGS_HINT})")
  if isinstance(error, (KeyError, AttributeError)) and key:
    return f"--config.{key.group(1)}: no such setting ({SETTINGS_HINT})"
  return f"{text} ({SETTINGS_HINT})"


def _config_file_problem(error: BaseException) -> str | None:
  """`--config=FILE: line N: ...` for an error raised by the config file's own code."""
  if isinstance(error, SyntaxError) and error.filename and error.filename.endswith(".py"):
    where, line = error.filename, error.lineno
  else:
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if f.filename.endswith(".py") and "-packages" + os.sep not in f.filename
              and not f.filename.startswith(_PACKAGE_DIR)]
    if not frames:
      return None
    where, line = frames[-1].filename, frames[-1].lineno
  message = " ".join(str(error).split())
  return f"--config={where}: line {line}: {type(error).__name__}: {message}"


def _check_config(flag_values: flags.FlagValues) -> None:
  """Loads `--config` with its overrides now, turning each failure into a UsageProblem."""
  config_flag = flag_values["config"]
  if config_flag.value is None and not config_flag.present:
    raise UsageProblem(f"--config is required, e.g. --config=configs/digits.py ({SETTINGS_HINT})")
  path = config_flags.get_config_filename(config_flag)
  if not os.path.isfile(path.split(":", 1)[0]):
    raise UsageProblem(_config_path_problem(path))
  try:
    # Loads the file and applies the overrides; a failure is kept until the config is used.
    config_flag.value.get("loss")
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    raise UsageProblem(_override_problem(e)) from e
  except (OSError, SyntaxError) as e:
    first = " ".join(str(e).split())
    raise UsageProblem(f"--config={path} cannot be loaded: {first}") from e


def parse(flag_values: flags.FlagValues, argv: Sequence[str], *, prog: str,
          required: Sequence[str] = (), positional: int = 0) -> list[str]:
  """Parses `argv` (without the program name) into `flag_values`; the positional arguments.

  Raises UsageProblem (one line) for any mistake: an unknown flag, a missing `required` one,
  more than `positional` positional arguments, and, where the command has `--config`, a config
  file or override that fails.
  """
  flag_values.unparse_flags()
  argv = _resolve_config_path(list(argv))
  open_overrides = []
  if "config" in flag_values:
    argv, open_overrides = _split_open_overrides(argv)
  if "config" in flag_values:
    default = _CONFIG_DEFAULTS.get(id(flag_values))
    if default and not any(re.match(r"^--?config(=|$)", a) for a in argv):
      argv.insert(0, f"--config={default}")  # its overrides need the file named first
    for name in [n for n in flag_values if n.startswith("config.")]:
      delattr(flag_values, name)  # the overrides of an earlier parse (commands run in-process)
    # config_flags finds the `--config.KEY` overrides in sys.argv unless told the argv.
    flag_values["config"]._sys_argv = [prog, *argv]  # pylint: disable=protected-access
  try:
    rest = flag_values([prog, *argv])[1:]
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] + (f" {lines[-1]}" if len(lines) > 1 and lines[0].endswith(":") else "")
    raise UsageProblem(text) from e
  except Exception as e:  # pylint: disable=broad-except; loading runs the config file's code
    raise UsageProblem(_config_file_problem(e) or _override_problem(e)) from e
  if "config" in flag_values:
    _check_config(flag_values)
    _apply_open_overrides(flag_values["config"].value, open_overrides)
  for name in required:
    if flag_values[name].value in (None, ""):
      raise UsageProblem(f"--{name} is required: {flag_values[name].help}")
  if len(rest) > positional:
    extra = " ".join(rest[positional:])
    hint = " (settings are given as --config.NAME=VALUE)" if "config" in flag_values else ""
    raise UsageProblem(f"unexpected arguments: {extra}{hint}")
  return rest


def _print_help(flag_values: flags.FlagValues, module: str, doc: str | None) -> None:
  print(f"usage: python -m {module} [flags]\n")
  if doc:
    print(doc.strip() + "\n")
  print(flag_values.get_help())


def logged_by_hn_jax(record: py_logging.LogRecord) -> bool:
  """Whether one of hn_jax's own modules logged `record` (absl logs every library under one
  logger name, "absl": the module's file tells them apart, wherever the checkout and the
  libraries live)."""
  return os.path.abspath(record.pathname).startswith(_PACKAGE_DIR + os.sep)


class _OnlyOurs(py_logging.Filter):
  """Lets through warnings and errors, and INFO lines of hn_jax itself. Drops Orbax's
  tracebacks of a failed background save: the error reaches the run, which reports it in
  one line."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname:
      return False
    return record.levelno >= py_logging.WARNING or logged_by_hn_jax(record)


@contextlib.contextmanager
def stderr_silenced():
  """File descriptor 2 points at /dev/null inside (C++ libraries write there directly)."""
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
  """Imports TensorFlow, whenever something first does, off the GPUs (it only feeds data;
  the accelerators are JAX's) and, when `quiet`, without the lines its C++ start-up writes to
  stderr before any log level applies (TF_CPP_MIN_LOG_LEVEL no longer hides them). So a
  command imports TensorFlow only where its data needs it."""

  def __init__(self, quiet: bool = True):
    self.quiet = quiet

  def find_spec(self, name, path, target=None):
    if name != "tensorflow":
      return None
    spec = importlib.machinery.PathFinder.find_spec(name, path, target)
    if spec is None or spec.loader is None:
      return spec
    original = spec.loader.exec_module

    def exec_module(module):
      if self in sys.meta_path:
        sys.meta_path.remove(self)
      with stderr_silenced() if self.quiet else contextlib.nullcontext():
        original(module)
      try:
        module.config.set_visible_devices([], "GPU")
      except Exception:  # pylint: disable=broad-except; no GPU build, or already initialized
        pass

    spec.loader.exec_module = exec_module
    return spec


def _excepthook_without_closed_loops(previous):
  """`previous`, except for the "Event loop is closed" errors that TensorStore's callbacks
  print after Orbax gave up on a failed background save (the run reports the failure)."""

  def hook(kind, value, tb):
    if kind is RuntimeError and str(value) == "Event loop is closed":
      return
    previous(kind, value, tb)

  hook.hn_jax_quiet = True
  return hook


def quiet_libraries(flag_values: flags.FlagValues) -> None:
  """Hides the INFO chatter of libraries (Orbax, JAX, TensorFlow) unless --verbosity is given;
  keeps TensorFlow, whenever it is imported, off the GPUs."""
  verbose = "verbosity" in flag_values and flag_values["verbosity"].present
  if "tensorflow" not in sys.modules and not any(
      isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _QuietTensorFlowImport(quiet=not verbose))
  if verbose:
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  if not getattr(sys.excepthook, "hn_jax_quiet", False):
    sys.excepthook = _excepthook_without_closed_loops(sys.excepthook)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _OnlyOurs) for f in handler.filters):
    handler.addFilter(_OnlyOurs())


def run(main: Callable[[list[str]], int | None], flag_values: flags.FlagValues,
        argv: Sequence[str] | None, *, prog: str, doc: str | None = None,
        required: Sequence[str] = (), positional: int = 0,
        errors: tuple[type[BaseException], ...] = (), module: str | None = None) -> int:
  """Parses `argv` (default: the process's, without the program name), then `main(positional)`.

  `prog` names the command in its messages; `module` (default: `prog`) is what `--help`'s
  usage line runs, `python -m MODULE`.

  Returns the exit status: 0 on `--help` and on success (or `main`'s own status), 2 with
  one line `PROG: error: ...` on a usage problem or one of `errors` raised by `main`, 1 with
  one line on an `errors.RunStopped` (a run that cannot go on), 130 on Ctrl-C; 0 with one line
  on a preemption (SIGTERM: checkpointed, the same command resumes); 141, silently, when the
  reader of stdout went away (`| head`).
  """
  try:
    return _run(main, flag_values, argv, prog=prog, doc=doc, required=required,
                positional=positional, errors=errors, module=module or prog)
  except BrokenPipeError:  # the reader of stdout went away (`| head`): stop quietly
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141


def _run(main: Callable[[list[str]], int | None], flag_values: flags.FlagValues,
         argv: Sequence[str] | None, *, prog: str, doc: str | None,
         required: Sequence[str], positional: int,
         errors: tuple[type[BaseException], ...], module: str) -> int:
  from hn_jax.errors import (  # pylint: disable=g-import-not-at-top
      Interrupted, Preempted, RunStopped)
  argv = list(sys.argv[1:] if argv is None else argv)
  if wants_help(argv):
    _print_help(flag_values, module, doc)
    return 0
  try:
    rest = parse(flag_values, argv, prog=prog, required=required, positional=positional)
  except UsageProblem as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2
  if not flags.FLAGS.is_parsed():  # absl's own flags: else its first log line says so
    flags.FLAGS.mark_as_parsed()
  logging.use_absl_handler()
  if not flag_values["verbosity"].present:
    logging.set_verbosity(logging.INFO)  # absl's app.run does the same
  quiet_libraries(flag_values)
  compile_cache.enable(flag_values["xla_cache"].value if "xla_cache" in flag_values else None,
                       warn=lambda line: print(f"{prog}: {line}", file=sys.stderr))
  try:
    status = main(rest)
  except Preempted as e:
    print(f"{prog}: {e}", file=sys.stderr)
    return 0
  except Interrupted as e:
    print(f"{prog}: {e}", file=sys.stderr)
    return 130
  except KeyboardInterrupt:
    print(f"{prog}: stopped by Ctrl-C", file=sys.stderr)
    return 130
  except errors as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2
  except RunStopped as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 1
  return 0 if status is None else status
