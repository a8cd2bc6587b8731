"""A workdir belongs to one run: its config is recorded there and checked on every resume.

`config.json` in the workdir holds the config the run uses now (what `embed`, `search` and
a resume read). A run started again on the workdir compares its config with that file:

* a setting that shapes the run (model, dimension, loss and its parameters, dataset,
  batch, sampler, seed, learning rate and schedule, precision, image transforms, ...)
  cannot change mid-run: `check` raises one `ConfigMismatch` naming every such difference;
* a setting listed in `CHANGEABLE` (how long to train, how often to evaluate, where the
  data lives, evaluation memory, ...) may change: `record` rewrites `config.json` with the
  new value and appends the change to `config_history.json` (a list of
  `{"time", "changes": {key: [old, new]}}`), so the run's history stays readable.

A setting missing on one side (a config from an older version) counts as a difference
unless it is changeable. Pure functions of config dicts, plus `record`'s file writes.

A workdir may be a local folder or a bucket URL (`gs://...`, as on a TPU pod): every file of
it is reached through `workdir_path` (etils' epath, which Orbax uses too), never `open`/`os`.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Mapping

import ml_collections
from etils import epath

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.json"
# Settings a resumed run may change; any other setting belongs to the run for good.
CHANGEABLE = frozenset({
    "num_epochs",  # train longer (or stop earlier)
    "eval_every",
    "eval_batch_size",  # evaluation embeds in inference mode: the batch does not matter
    "eval_max_bytes",
    "checkpoints_to_keep",
    "max_consecutive_skips",
    "data_dir",  # the same prepared data, elsewhere
    # How decoded images are kept (memory, a file, where, how much), not what they are.
    "cache", "cache_images", "cache_dir", "cache_memory_gb",
    "pretrained",  # read only when a run starts: a resumed run takes its weights from the checkpoint
})
_MISSING = "(not set)"


class ConfigMismatch(ValueError):
  """The config differs from the workdir's in settings a run cannot change; one line."""


def as_plain(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  """The config as JSON would store it (tuples as lists)."""
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json())
  return json.loads(json.dumps(dict(config)))


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
  """The workdir as a path: a local folder made absolute, a URL (`gs://...`) as it is."""
  if "://" in os.fspath(workdir):
    return epath.Path(workdir)
  return epath.Path(os.path.abspath(workdir))


def load(workdir: str) -> dict[str, Any] | None:
  """The workdir's recorded config, or None for a workdir without one."""
  path = workdir_path(workdir) / CONFIG_FILE
  if not path.is_file():
    return None
  return json.loads(path.read_text())


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """key -> (old, new) for every setting that differs (missing on a side: `_MISSING`)."""
  old, new = as_plain(old), as_plain(new)
  return {k: (old.get(k, _MISSING), new.get(k, _MISSING)) for k in sorted(set(old) | set(new))
          if old.get(k, _MISSING) != new.get(k, _MISSING)}


def _show(value: Any) -> str:
  return value if value is _MISSING else json.dumps(value)


def check(config: ml_collections.ConfigDict | Mapping[str, Any], workdir: str
          ) -> dict[str, tuple[Any, Any]]:
  """The changeable settings that differ from the workdir's (key -> (old, new)).

  Raises ConfigMismatch naming every other difference, with both values and the fix.
  A workdir without a recorded config gives {}.
  """
  recorded = load(workdir)
  if recorded is None:
    return {}
  changed = differences(recorded, config)
  fixed = {k: v for k, v in changed.items() if k not in CHANGEABLE}
  if fixed:
    listed = "; ".join(f"config.{k}={_show(new)} but the run has {_show(old)}"
                       for k, (old, new) in fixed.items())
    raise ConfigMismatch(
        f"{workdir} holds a run of another config: {listed}. These settings cannot change "
        f"mid-run: use a new --workdir, or drop the overrides to resume the run as it was "
        f"(its settings: {os.path.join(workdir, CONFIG_FILE)})")
  return {k: v for k, v in changed.items() if k in CHANGEABLE}


def describe(changes: Mapping[str, tuple[Any, Any]]) -> str:
  """`num_epochs 20 -> 25, eval_every 5 -> 1`."""
  return ", ".join(f"{k} {_show(old)} -> {_show(new)}" for k, (old, new) in changes.items())


def record(config: ml_collections.ConfigDict, workdir: str,
           changes: Mapping[str, tuple[Any, Any]] | None = None) -> None:
  """Writes `config` as the workdir's config.json; appends `changes` to its history."""
  folder = workdir_path(workdir)
  folder.mkdir(parents=True, exist_ok=True)
  if changes:
    path = folder / HISTORY_FILE
    history = json.loads(path.read_text()) if path.is_file() else []
    history.append({"time": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "changes": {k: list(v) for k, v in changes.items()}})
    _write(path, json.dumps(history, indent=2))
  _write(folder / CONFIG_FILE, config.to_json(indent=2))


def _write(path: epath.Path, text: str) -> None:
  """Replaces `path` at once: a crash leaves the old file or the new one."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text + "\n")
  tmp.replace(path)
