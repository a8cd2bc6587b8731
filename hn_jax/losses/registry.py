"""The loss registry: a dict of names to factories, and `register` to add one.

A factory is called as `factory(*, embedding_dim, num_classes, rngs, **hyperparameters)` and
returns an `nnx.Module` that maps `(embeddings, labels)` to `(loss, aux)`: a scalar loss and a
dict of float32 scalars. Its keyword parameters other than those three are the loss's
hyperparameters; their defaults are the loss's defaults (`hyperparameters(name)`).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from flax import nnx

Factory = Callable[..., nnx.Module]

# What every factory is given; not hyperparameters.
CONTEXT = ("embedding_dim", "num_classes", "rngs")

_FACTORIES: dict[str, Factory] = {}
# name -> {hyperparameter or "learning_rate": (low, high, scale)}: where a study searches
# (hn_jax.tools.study); scale is "log" or "linear", and "int" rounds a linear range.
_SEARCH_SPACES: dict[str, dict[str, tuple[float, float, str]]] = {}
# The registered names, in registration order (kept in place, so `losses.NAMES` stays current).
NAMES: list[str] = []


class MemoryState(nnx.Variable):
  """A loss's state carried from step to step without gradient (cross-batch memory)."""


def register(name: str, factory: Factory | None = None, *,
             search_space: dict[str, tuple[float, float, str]] | None = None) -> Any:
  """Adds `factory` under `name`; used bare (`register("x", f)`) or as a decorator.

  `search_space` declares the ranges a study searches: {setting: (low, high, scale)} over the
  loss's hyperparameters and "learning_rate" (scale "log", "linear" or "int").
  """

  def add(f: Factory) -> Factory:
    if name in _FACTORIES and _FACTORIES[name] is not f:
      raise ValueError(f"a loss named {name!r} is already registered")
    if name not in _FACTORIES:
      NAMES.append(name)
    _FACTORIES[name] = f
    if search_space is not None:
      _SEARCH_SPACES[name] = dict(search_space)
    return f

  return add if factory is None else add(factory)


def factory_of(name: str) -> Factory:
  if name not in _FACTORIES:
    raise ValueError(f"unknown loss {name!r}; use one of {', '.join(NAMES)}")
  return _FACTORIES[name]


def hyperparameters(name: str) -> dict[str, Any]:
  """The loss's hyperparameters and their defaults (inspect.Parameter.empty: required)."""
  signature = inspect.signature(factory_of(name))
  return {p.name: p.default for p in signature.parameters.values()
          if p.name not in CONTEXT
          and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def search_space(name: str) -> dict[str, tuple[float, float, str]]:
  """The ranges a study searches for `name` (empty: the study's default learning rates)."""
  factory_of(name)
  return dict(_SEARCH_SPACES.get(name, {}))


def create(name: str, *, embedding_dim: int, num_classes: int, rngs: nnx.Rngs,
           **kwargs: Any) -> nnx.Module:
  """The loss `name` with the given hyperparameters (the others at their defaults)."""
  valid = hyperparameters(name)
  unknown = sorted(set(kwargs) - set(valid))
  if unknown:
    raise ValueError(f"loss {name!r} has no hyperparameter {', '.join(unknown)}; "
                     f"its hyperparameters: {', '.join(valid) or '(none)'}")
  return factory_of(name)(embedding_dim=embedding_dim, num_classes=num_classes, rngs=rngs,
                          **kwargs)
