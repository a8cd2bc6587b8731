"""A run's config: its defaults, its validation, and the rule that ties a workdir to one run.

`defaults()` holds every setting with a one-line comment; the files in configs/ change what
differs (configs/default.py is the defaults alone). `validate` checks the values that cannot
work, before anything compiles. A workdir belongs to one run: `config.json` in the workdir
holds the config the run uses now (what `hn_jax.tools.embed`, `search` and a resume read,
through `read`). A run started again on the workdir compares its config with that file:

* a setting that shapes the run (model, dimension, loss and its parameters, dataset,
  batch, sampler, seed, optimizer and schedule, image transforms, ...) cannot change
  mid-run: `check` raises one `ConfigMismatch` naming every such difference;
* a setting listed in `CHANGEABLE` (how long to train, how often to evaluate, where the
  data lives, evaluation memory, and the base learning rate and precision, which a run
  stopped by non-finite steps is told to lower) may change: `record` rewrites
  `config.json` with the new value and appends the change to `config_history.json` (a list of
  `{"time", "changes": {key: [old, new]}}`), so the run's history stays readable.

A setting the recorded config lacks (it was written by an older version) counts as the
default it has now: equal when the new config keeps that default; any other missing setting
is a difference unless it is changeable. `check_run` is both checks, once per entry point (hn_jax.main,
or `train.train_and_evaluate` for library callers). No TensorFlow and no JAX are imported here.

A workdir may be a local folder or a bucket URL (`gs://...`, as on a TPU pod): every file of
it is reached through `workdir_path` (etils' epath, which Orbax uses too), never `open`/`os`.
"""

from __future__ import annotations

import datetime
import importlib
import json
import math
import os
import re
from typing import Any, Mapping

import ml_collections
from etils import epath

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.json"
# hn_jax.checkpoints' folder, and the key of its progress JSON that holds the run's settings
# (a second record of them, beside config.json: `load` falls back to it).
CHECKPOINT_FOLDER = "checkpoints"
CHECKPOINT_CONFIG_KEY = "config"
# The highest seed (NumPy's and JAX's seeds are 64-bit; the samplers' are signed).
MAX_SEED = 2**63 - 1
# Distinct glyphs the synthetic set can draw (5 x 3 half-glyphs with at least 4 cells on).
SYNTHETIC_MAX_CLASSES = 32192
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
    # What a run stopped by non-finite steps is told to change before it resumes.
    "learning_rate", "half_precision",
    # What TensorBoard shows beside the scalars (hn_jax.summaries).
    "projector_points", "projector_every_eval", "neighbour_queries",
})
_MISSING = "(not set)"
OPTIMIZERS = ("sgd", "adamw")  # as hn_jax.train_step's (which imports JAX; this module does not)
LR_SCHEDULES = ("step", "cosine")
# Models with published weights that config.pretrained can read (hn_jax.pretrained).
PRETRAINED_MODELS = ("resnet18", "resnet50", "googlenet", "vit_small_patch16", "vit_base_patch16")


def defaults() -> ml_collections.ConfigDict:
  """Every setting of a run, with its default.

  The model and schedule are the paper's CUB recipe on ResNet50 (ImageNet normalization; CUB's
  own is in configs/cub.py); the data is the embedded digits set, so that the defaults run
  anywhere. The configs in configs/ change what differs.
  """
  config = ml_collections.ConfigDict()
  # Data.
  # digits, synthetic (no download), cub, cars, sop, inshop, hotels50k, or folder (your images).
  config.dataset = "digits"
  config.data_dir = ""  # Where prepared datasets live; empty: $HN_DATA_DIR (unused by digits, synthetic).
  # dataset "folder": a folder of <class>/<image> (or train/, test/ of them) or a CSV file of
  # path,label[,split] rows; prepared on first use (docs/folder.md).
  config.folder = ""
  # Decoded-image cache (README, "Datasets"): "auto" (memory if it fits cache_memory_gb, else a
  # memory-mapped file if it fits the disk, else off), "memory", "disk" or "off".
  config.cache = "auto"
  config.cache_dir = ""  # Folder of cache files; empty: <data_dir>/image_cache (prepared sets).
  config.cache_memory_gb = 0.0  # RAM "auto" may fill with decoded images; 0: a quarter of it.
  config.synthetic_classes = 200  # synthetic: classes generated; the first half train, the rest test.
  config.synthetic_images_per_class = 10  # synthetic: images per class.
  # Validation on held-out training classes (docs/study.md): 0, off (evaluate on the test
  # split); k >= 2, deal the training classes into k folds, train on all but `fold` and
  # evaluate on `fold` (the test split is not read).
  config.folds = 0
  config.fold = 0  # The held-out fold, 0 .. folds - 1 (with folds >= 2).
  config.fold_seed = 0  # Deals the training classes into the folds (the same for every run).
  config.image_size = 256  # Side of the square crop fed to the model.
  config.mean = (0.485, 0.456, 0.406)  # Per-channel RGB mean of the dataset, images in [0, 1].
  config.std = (0.229, 0.224, 0.225)  # Per-channel RGB standard deviation.
  config.sampler = "filled"  # Batch sampler: "filled" (CUB, CARS) or "sample" (SOP, ...).
  config.images_per_class = 2  # Images of each class in a batch, side by side.
  config.repeat = 1  # Rounds over the classes per epoch ("sample" sampler only).
  # Model.
  # Backbone: "resnet50", "resnet18", "googlenet" (torchvision's), "vit_small_patch16",
  # "vit_base_patch16" (timm's), or for tests and tiny images "small" (a ResNet10),
  # "googlenet_mini", "vit_mini".
  config.model = "resnet50"
  config.embedding_dim = 64  # Output dimension of the embedding head.
  # Backbone weights: "imagenet" (the published ImageNet weights of config.model, downloaded
  # once; "dino": DINO's, ViTs only; docs/weights.md), a path of torchvision (ResNet,
  # GoogLeNet) or timm / DINO (ViT) weights, or "none" / "": random init.
  config.pretrained = ""
  config.half_precision = False  # Compute in bfloat16 (parameters, loss, optimizer stay float32).
  # Loss.
  # Any registered loss (hn_jax.losses.NAMES): the paper's "hn" (hardest negative), "shn"
  # (semi-hard), "sct" (selective), ... (docs/losses.md).
  config.loss = "sct"
  config.lam = 1.0  # hn/shn/sct: weight of sct's hard-triplet term.
  config.temperature = 0.1  # hn/shn/sct: temperature t of softplus((S_an - S_ap) / t).
  config.hard_threshold = 0.8  # sct: a negative more similar than this makes a hard triplet.
  # The loss's other hyperparameters, e.g. --config.loss_params.margin=0.2 (unset: its defaults).
  config.loss_params = ml_collections.ConfigDict()
  config.miner = ""  # A miner for pair and triplet losses; empty: none.
  config.miner_params = ml_collections.ConfigDict()  # e.g. --config.miner_params.margin=0.1
  config.memory_size = 0  # Cross-batch memory of this many embeddings (pair/triplet losses); 0: none.
  config.loss_lr_multiplier = 1.0  # The loss's own parameters (proxies) train at this x the rate.
  # A Python module imported first, which registers your own loss (docs/losses.md).
  config.loss_module = ""
  # Optimization.
  config.learning_rate = 0.009  # SGD learning rate (sct on CUB; shn uses 0.002).
  config.lr_drop_epochs = (40,)  # Epochs after which the learning rate is multiplied by 0.1.
  config.momentum = 0.0  # SGD momentum (the release used none).
  # "sgd" (the release's: plain SGD, with config.momentum) or "adamw" (Adam 0.9, 0.999, eps
  # 1e-8, decoupled weight decay: torch.optim.AdamW's).
  config.optimizer = "sgd"
  # sgd: L2 term added to the gradient (torch SGD's weight_decay); adamw: decoupled decay,
  # times the learning rate. On every parameter. 0: none (the release's).
  config.weight_decay = 0.0
  # Epochs (a fraction allowed) over which the rate ramps linearly from 0 to learning_rate.
  config.warmup_epochs = 0.0
  # "step": x0.1 after each epoch of lr_drop_epochs; "cosine": from learning_rate to 0 over
  # cosine_epochs epochs after the warm-up, then 0.
  config.lr_schedule = "step"
  config.cosine_epochs = 0  # Length of the cosine ("cosine" only, and then required, >= 1).
  config.batch_size = 128  # Global batch size, over all devices and hosts.
  config.num_epochs = 80  # Epochs of training.
  config.seed = 0  # Seeds the initialization, the batch order and the augmentation.
  # Evaluation and bookkeeping.
  config.eval_every = 10  # Evaluate (and checkpoint) every this many epochs, and at epoch 0.
  config.eval_batch_size = 256  # Global batch size when embedding for evaluation.
  # Bytes of similarities in flight while ranking (over all devices); bounds evaluation memory.
  config.eval_max_bytes = 2 * 1024**3
  config.max_consecutive_skips = 10  # Stop after this many non-finite steps in a row.
  config.checkpoints_to_keep = 2  # Orbax keeps this many of the latest checkpoints.
  # TensorBoard (docs/tensorboard.md): test points in the Projector (whole classes, seeded;
  # 0: no projector), written at the final evaluation or, with projector_every_eval, at each.
  config.projector_points = 2000
  config.projector_every_eval = False  # Write the projector at every evaluation, not only the last.
  config.neighbour_queries = 8  # Test queries shown with their nearest neighbours (0: none).
  return config


class ConfigError(ValueError):
  """A config value that cannot work; the message names it and says how to fix it."""


_MODULE_NAME = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"


def import_loss_module(config: ml_collections.ConfigDict) -> None:
  """Imports `config.loss_module` (a module name, never code: it registers the user's own
  loss), if set."""
  name = config.get("loss_module", "")
  if name:
    if not re.fullmatch(_MODULE_NAME, name):
      raise ConfigError(f"config.loss_module={name!r} is not a module name; give a dotted "
                        "Python module name, e.g. mypkg.myloss")
    importlib.import_module(name)


def validate(config: ml_collections.ConfigDict, *, num_devices: int,
             num_processes: int) -> None:
  """Raises ConfigError on the first setting that cannot work, before anything compiles."""
  # The names each setting may take, from the modules that define them (none imports TF).
  from hn_jax import losses, models, weights_cache  # pylint: disable=g-import-not-at-top
  from hn_jax.data import datasets, image_cache, samplers  # pylint: disable=g-import-not-at-top

  def need(ok: bool, message: str) -> None:
    if not ok:
      raise ConfigError(message)

  for key, value in config.items():
    if isinstance(value, float):
      need(math.isfinite(value), f"config.{key}={value} must be a finite number")
  try:
    import_loss_module(config)
  except ImportError as e:
    raise ConfigError(f"config.loss_module={config.loss_module!r} cannot be imported ({e}); "
                      "put its package on PYTHONPATH or install it") from None
  need(config.loss in losses.NAMES,
       f"config.loss={config.loss!r} is not a loss; use one of {', '.join(losses.NAMES)}"
       + ("" if config.get("loss_module") else " (or register yours: --config.loss_module)"))
  paper = sorted(set(config.get("loss_params") or {}) & {"lam", "temperature", "hard_threshold"})
  if config.loss in losses.METHODS and paper:
    raise ConfigError(f"config.loss_params.{paper[0]} is set; the paper's losses take it as "
                      f"--config.{paper[0]} (one place for each setting)")
  need(isinstance(config.get("memory_size", 0), int) and config.get("memory_size", 0) >= 0,
       f"config.memory_size={config.get('memory_size')!r} must be an integer >= 0")
  need(isinstance(config.get("loss_lr_multiplier", 1.0), (int, float))
       and config.get("loss_lr_multiplier", 1.0) > 0,
       f"config.loss_lr_multiplier={config.get('loss_lr_multiplier')!r} must be positive")
  try:
    losses.check(config.loss, dict(config.get("loss_params") or {}), config.get("miner", ""),
                 dict(config.get("miner_params") or {}), config.get("memory_size", 0))
  except ValueError as e:
    raise ConfigError(f"config.loss={config.loss!r}: {e}") from None
  folds = config.get("folds", 0)
  need(folds == 0 or folds >= 2,
       f"config.folds={folds}: use 0 (no validation folds) or at least 2")
  need(folds == 0 or 0 <= config.get("fold", 0) < folds,
       f"config.fold={config.get('fold', 0)}: use a fold in 0..{folds - 1} (config.folds={folds})")
  need(config.dataset in datasets.DATASET_NAMES,
       f"config.dataset={config.dataset!r} is not a dataset; use one of "
       f"{', '.join(datasets.DATASET_NAMES)}")
  folder = config.get("folder", "")
  if config.dataset == datasets.FOLDER:
    need(bool(folder), "config.dataset='folder' needs --config.folder=DIR (class folders of "
         "images) or =FILE.csv (path,label[,split] rows); see docs/folder.md")
    need(os.path.exists(os.path.expanduser(folder)),
         f"config.folder={folder}: no such folder or file")
  else:
    need(not folder, f"config.folder={folder} is set but config.dataset={config.dataset!r}; use "
         "--config=configs/folder.py (or --config.dataset=folder) to train on it")
  need(config.model in models.MODEL_NAMES,
       f"config.model={config.model!r} is not a model; use one of {', '.join(models.MODEL_NAMES)}")
  need(config.sampler in samplers.SAMPLERS,
       f"config.sampler={config.sampler!r} is not a sampler; use one of "
       f"{', '.join(samplers.SAMPLERS)}")
  for name in ("projector_points", "neighbour_queries"):
    value = config.get(name, 0)
    need(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
         f"config.{name}={value!r} must be a non-negative integer (0: none)")
  need(isinstance(config.get("projector_every_eval", False), bool),
       f"config.projector_every_eval={config.get('projector_every_eval')!r} must be True or False")
  for name in ("embedding_dim", "batch_size", "eval_batch_size", "images_per_class", "repeat",
               "eval_every", "image_size", "eval_max_bytes"):
    value = config[name]
    need(isinstance(value, int) and value >= 1,
         f"config.{name}={value!r} must be a positive integer")
  need(config.images_per_class >= 2,
       f"config.images_per_class={config.images_per_class} must be at least 2 (a positive "
       "pair per class)")
  need(config.image_size >= 16, f"config.image_size={config.image_size} must be at least 16")
  need(isinstance(config.num_epochs, int) and config.num_epochs >= 0,
       f"config.num_epochs={config.num_epochs!r} must be a non-negative integer")
  m, b = config.images_per_class, config.batch_size
  need(b % m == 0, f"config.batch_size={b} must be a multiple of config.images_per_class={m}; "
       f"try --config.batch_size={max(m, b // m * m)}")
  need(b % num_devices == 0, f"config.batch_size={b} is not divisible by the {num_devices} "
       f"devices; use a multiple of {num_devices}, e.g. --config.batch_size="
       f"{max(1, b // num_devices) * num_devices}")
  need((b // num_processes) % m == 0,
       f"config.batch_size={b} splits into {b // num_processes} images per process, which is "
       f"not a multiple of config.images_per_class={m}; use a multiple of {m * num_processes}")
  need(config.eval_batch_size % num_devices == 0,
       f"config.eval_batch_size={config.eval_batch_size} is not divisible by the {num_devices} "
       f"devices; use a multiple of {num_devices}")
  need(config.learning_rate > 0, f"config.learning_rate={config.learning_rate} must be positive")
  need(config.temperature > 0, f"config.temperature={config.temperature} must be positive")
  need(0 <= config.momentum < 1, f"config.momentum={config.momentum} must be in [0, 1)")
  need(config.optimizer in OPTIMIZERS,
       f"config.optimizer={config.optimizer!r} is not an optimizer; use one of "
       f"{', '.join(OPTIMIZERS)}")
  need(config.optimizer == "sgd" or not config.momentum,
       f"config.momentum={config.momentum} is SGD's; config.optimizer={config.optimizer!r} "
       "has its own moments: leave momentum at 0")
  need(isinstance(config.weight_decay, (int, float)) and config.weight_decay >= 0,
       f"config.weight_decay={config.weight_decay!r} must be a number >= 0")
  need(isinstance(config.warmup_epochs, (int, float)) and config.warmup_epochs >= 0,
       f"config.warmup_epochs={config.warmup_epochs!r} must be a number of epochs >= 0")
  need(config.lr_schedule in LR_SCHEDULES,
       f"config.lr_schedule={config.lr_schedule!r} is not a schedule; use one of "
       f"{', '.join(LR_SCHEDULES)}")
  need(config.lr_schedule != "cosine"
       or (isinstance(config.cosine_epochs, int) and config.cosine_epochs >= 1),
       f"config.lr_schedule='cosine' needs config.cosine_epochs >= 1 (the epochs the cosine "
       f"spans after the warm-up; got {config.cosine_epochs!r}), e.g. --config.cosine_epochs="
       f"{max(1, config.num_epochs - int(config.warmup_epochs))}")
  need(config.lr_schedule == "cosine" or not config.cosine_epochs,
       f"config.cosine_epochs={config.cosine_epochs!r} is set but config.lr_schedule="
       f"{config.lr_schedule!r}; set --config.lr_schedule=cosine or leave cosine_epochs at 0")
  need(all(isinstance(e, int) and e >= 1 for e in config.lr_drop_epochs),
       f"config.lr_drop_epochs={tuple(config.lr_drop_epochs)!r} must be positive epoch numbers")
  if config.pretrained not in weights_cache.RANDOM:
    need(config.model in PRETRAINED_MODELS,
         f"config.pretrained={config.pretrained!r} but config.model={config.model!r} has no "
         f"torchvision weights (nor timm's); use one of {', '.join(PRETRAINED_MODELS)}, or "
         "--config.pretrained=none")
    if weights_cache.is_name(config.pretrained):
      have = weights_cache.models_with(config.pretrained)
      need(config.model in have,
           f"config.pretrained={config.pretrained!r}: no published weights of that name for "
           f"config.model={config.model!r} (only for {', '.join(have)}); give a file's path, or "
           "--config.pretrained=none")
    else:
      need(os.path.isfile(config.pretrained),
           f"config.pretrained={config.pretrained!r}: no such file; give the path of "
           f"torchvision or timm weights (.pth, .npz or .safetensors), or a name "
           f"({', '.join(weights_cache.NAMES)}: downloaded once; none: random init), see "
           "docs/weights.md")
  if config.model in models.VIT_SPECS:
    patch = models.VIT_SPECS[config.model][0]
    need(config.image_size % patch == 0,
         f"config.image_size={config.image_size} must be a multiple of {config.model}'s patch "
         f"size {patch}; try --config.image_size={max(patch, config.image_size // patch * patch)}")
  need("cache_images" not in config,
       "config.cache_images was replaced by config.cache (auto, memory, disk or off); use "
       "--config.cache=memory for cache_images=True, or leave the default (auto)")
  need(config.get("cache", "auto") in image_cache.MODES,
       f"config.cache={config.get('cache')!r} is not a cache mode; use one of "
       f"{', '.join(image_cache.MODES)}")
  need(config.get("cache_memory_gb", 0) >= 0,
       f"config.cache_memory_gb={config.get('cache_memory_gb')} must be >= 0 (0: a quarter of "
       "this host's memory)")
  need(isinstance(config.seed, int) and 0 <= config.seed <= MAX_SEED,
       f"config.seed={config.seed!r} must be an integer in [0, 2**63 - 1]")
  need(isinstance(config.checkpoints_to_keep, int) and config.checkpoints_to_keep >= 1,
       f"config.checkpoints_to_keep={config.checkpoints_to_keep!r} must be at least 1 (the "
       "newest checkpoints kept; 0 would delete every one, finished ones included)")
  need(isinstance(config.max_consecutive_skips, int) and config.max_consecutive_skips >= 1,
       f"config.max_consecutive_skips={config.max_consecutive_skips!r} must be at least 1 (the "
       "run stops after this many non-finite steps in a row)")
  if config.dataset == "synthetic":
    need(isinstance(config.synthetic_classes, int)
         and 2 <= config.synthetic_classes <= SYNTHETIC_MAX_CLASSES,
         f"config.synthetic_classes={config.synthetic_classes!r} must be in [2, "
         f"{SYNTHETIC_MAX_CLASSES}] (the distinct glyphs the synthetic set can draw)")
  need(len(config.mean) == 3 and len(config.std) == 3 and min(config.std) > 0,
       f"config.mean={tuple(config.mean)} and config.std={tuple(config.std)} must be 3 values "
       "each, std positive")


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


def from_plain(values: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A config from its JSON form: lists back to tuples where the default is a tuple, and the
  settings of older versions carried over (`cache_images` became `cache`)."""
  values = dict(values)
  if "cache_images" in values:  # runs from before config.cache: the cache is free to use
    del values["cache_images"]
    values.setdefault("cache", "auto")
  template = defaults()
  for key, value in values.items():
    if isinstance(template.get(key), tuple) and isinstance(value, list):
      values[key] = tuple(value)
  return ml_collections.ConfigDict(values)


def read(workdir: str) -> ml_collections.ConfigDict:
  """The workdir's recorded config; ConfigError if it has none."""
  recorded = load(workdir)
  if recorded is None:
    path = workdir_path(workdir) / CONFIG_FILE
    raise ConfigError(f"{path}: no such file; is {workdir!r} the workdir of a training run?")
  return from_plain(recorded)


_SAID: set[str] = set()  # the fallbacks `load` reported already (one line per workdir)


def load(workdir: str) -> dict[str, Any] | None:
  """The workdir's recorded config, or None for a workdir without one.

  A missing or broken config.json is replaced by the settings saved with the newest
  checkpoint (said in one line); a broken one with no checkpoint to stand for it, or a
  workdir that cannot be read, is a ConfigError.
  """
  folder = workdir_path(workdir)
  path = folder / CONFIG_FILE
  problem = None
  try:
    if path.is_file():
      try:
        values = json.loads(path.read_text())
      except ValueError as e:
        values, problem = None, f"is not valid JSON ({' '.join(str(e).split())[:120]})"
      if isinstance(values, dict) and values:
        return values
      problem = problem or "holds no settings"
  except OSError as e:
    raise ConfigError(f"--workdir {workdir}: cannot read {path} ({e.strerror or e}); give a "
                      "workdir you can read and write") from None
  except Exception as e:  # pylint: disable=broad-except; remote filesystems (gs://, ...)
    raise ConfigError(f"--workdir {workdir}: cannot reach it ({type(e).__name__}: "
                      f"{' '.join(str(e).split())[:160]}); check the network and the "
                      "credentials, or give a local --workdir") from None
  saved = saved_config(folder)
  if saved is not None:
    step, values = saved
    if os.fspath(folder) not in _SAID:
      _SAID.add(os.fspath(folder))
      from absl import logging  # pylint: disable=g-import-not-at-top
      logging.warning("%s %s: using the settings saved with the checkpoint of step %d (a "
                      "resumed run writes them back)", path,
                      problem or "is missing", step)
    return values
  if problem:
    raise ConfigError(f"{path} {problem} and no checkpoint records the run's settings; "
                      f"restore the file from a backup, or delete it to run with the --config "
                      "given")
  return None


def saved_config(workdir: str | os.PathLike) -> tuple[int, dict[str, Any]] | None:
  """(step, settings) saved with the workdir's newest checkpoint that holds them, if any.

  Read straight from its progress JSON (no Orbax, no JAX).
  """
  folder = workdir_path(workdir) / CHECKPOINT_FOLDER
  try:
    steps = sorted((int(p.name) for p in folder.iterdir() if p.name.isdigit()), reverse=True)
  except OSError:
    return None
  for step in steps:
    try:
      progress = json.loads((folder / str(step) / "progress" / "metadata").read_text())
    except (OSError, ValueError):
      continue
    values = progress.get(CHECKPOINT_CONFIG_KEY) if isinstance(progress, dict) else None
    if isinstance(values, dict) and values:
      return step, values
  return None


def file_is_sound(workdir: str) -> bool:
  """Whether the workdir's config.json exists and holds settings (else a run rewrites it)."""
  path = workdir_path(workdir) / CONFIG_FILE
  try:
    values = json.loads(path.read_text())
  except (OSError, ValueError):
    return False
  return isinstance(values, dict) and bool(values)


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
  default = as_plain(defaults())
  # A setting added after the run was recorded, at its default: the run had that behaviour.
  changed = {k: (old, new) for k, (old, new) in changed.items()
             if not (old is _MISSING and k in default and default[k] == new)}
  fixed = {k: v for k, v in changed.items() if k not in CHANGEABLE}
  if changed and not fixed:
    _read_history(workdir_path(workdir) / HISTORY_FILE)  # a broken one: one line, now
  if fixed:
    listed = "; ".join(f"config.{k}={_show(new)} but the run has {_show(old)}"
                       for k, (old, new) in fixed.items())
    raise ConfigMismatch(
        f"{workdir} holds a run of another config: {listed}. These settings cannot change "
        f"mid-run: use a new --workdir, or drop the overrides to resume the run as it was "
        f"(its settings: {os.path.join(workdir, CONFIG_FILE)})")
  return {k: v for k, v in changed.items() if k in CHANGEABLE}


def check_run(config: ml_collections.ConfigDict, workdir: str, *, num_devices: int,
              num_processes: int) -> dict[str, tuple[Any, Any]]:
  """`validate`, then `check`: the changeable settings that differ from the workdir's."""
  validate(config, num_devices=num_devices, num_processes=num_processes)
  return check(config, workdir)


def describe(changes: Mapping[str, tuple[Any, Any]]) -> str:
  """`num_epochs 20 -> 25, eval_every 5 -> 1`."""
  return ", ".join(f"{k} {_show(old)} -> {_show(new)}" for k, (old, new) in changes.items())


def record(config: ml_collections.ConfigDict, workdir: str,
           changes: Mapping[str, tuple[Any, Any]] | None = None) -> None:
  """Writes `config` as the workdir's config.json; appends `changes` to its history."""
  folder = workdir_path(workdir)
  try:
    folder.mkdir(parents=True, exist_ok=True)
    if changes:
      path = folder / HISTORY_FILE
      history = _read_history(path)
      history.append({"time": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"), "changes": {k: list(v) for k, v in changes.items()}})
      _write(path, json.dumps(history, indent=2))
    _write(folder / CONFIG_FILE, config.to_json(indent=2))
  except OSError as e:
    from hn_jax import errors  # pylint: disable=g-import-not-at-top
    raise errors.unwritable(folder, e) from None


def _read_history(path: epath.Path) -> list:
  """The change history at `path` ([] if none); ConfigError, one line, if it is broken."""
  if not path.is_file():
    return []
  try:
    history = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    history = e
  if not isinstance(history, list):
    raise ConfigError(f"{path} is not a readable change history ({type(history).__name__}); "
                      "move it aside (it only lists past changes of settings) and run again")
  return history


def _write(path: epath.Path, text: str) -> None:
  """Replaces `path` at once: a crash leaves the old file or the new one."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text + "\n")
  tmp.replace(path)
