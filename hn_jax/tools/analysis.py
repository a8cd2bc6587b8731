"""How one gradient step of a triplet's loss term moves its two similarities.

Usage::

    python -m hn_jax.tools.analysis gradient_field --loss=hn|shn|sct [--lr=0.1] [--projection=0.0]
        [--grid=20] [--lam=1.0] [--temperature=0.1] [--hard_threshold=0.8]
        --out=FILE.png [--json=FILE.json]

For every point of a grid over (S_ap, S_an) in [0, 1] x [0, 1]: an anchor a, a positive p and
a negative n, unit vectors with cos(a, p) = S_ap and cos(a, n) = S_an, whose parts orthogonal
to a have cosine ``projection`` (0: they are orthogonal). One plain gradient-descent step of
size ``lr`` is taken on the three (unnormalized) vectors, of that single triplet's term of the
method's loss (`hn_jax.losses.triplet_terms`: hn and shn, softplus((S_an - S_ap) / t); sct, that
on easy triplets and ``lam * S_an`` on hard ones), the gradient by `jax.grad` through
`hn_jax.losses`. The field is the change of S_ap and of S_an, measured again on the
renormalized vectors. Points where no such vectors exist are null: S_ap or S_an = 1 (the
orthogonal part vanishes, so no projection is defined), and S_ap above the loss's duplicate
threshold (such positives are skipped).

This is one triplet alone. In training every image is at once an anchor, a positive and a
negative of other triplets, and the batch-hard choice changes as the embedding moves, so a
field need not by itself explain what a whole batch does (e.g. hn's collapse).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags

from hn_jax import cli, losses


class AnalysisError(ValueError):
  """A bad argument; the message names it and the fix."""


def triplet_vectors(s_ap: np.ndarray, s_an: np.ndarray, projection: float) -> np.ndarray:
  """(..., 3, 3) float64 rows a, p, n: unit vectors with the given similarities.

  a = e1; p = S_ap e1 + sqrt(1 - S_ap^2) e2; n = S_an e1 + sqrt(1 - S_an^2) (c e2 +
  sqrt(1 - c^2) e3), c = projection.
  """
  s_ap, s_an = np.broadcast_arrays(np.asarray(s_ap, np.float64), np.asarray(s_an, np.float64))
  c = float(projection)
  r_p = np.sqrt(np.clip(1 - s_ap**2, 0, None))
  r_n = np.sqrt(np.clip(1 - s_an**2, 0, None))
  zero, one = np.zeros_like(s_ap), np.ones_like(s_ap)
  a = np.stack([one, zero, zero], -1)
  p = np.stack([s_ap, r_p, zero], -1)
  n = np.stack([s_an, r_n * c, r_n * np.sqrt(max(0.0, 1 - c * c))], -1)
  return np.stack([a, p, n], -2)


def valid_triplets(s_ap: np.ndarray, s_an: np.ndarray) -> np.ndarray:
  """Where a triplet with these similarities (and a defined projection) exists."""
  s_ap, s_an = np.asarray(s_ap), np.asarray(s_an)
  return ((s_ap < 1) & (s_an < 1) & (s_ap <= losses.DUPLICATE_SIMILARITY)
          & (s_ap > -1) & (s_an > -1))


@functools.lru_cache(maxsize=None)
def _step_fn(loss: str, lr: float, lam: float, temperature: float,
             hard_threshold: float) -> Callable[[Any], tuple[Any, Any, Any]]:
  """The jitted, batched step of `similarity_step`, compiled once per setting."""
  import jax  # pylint: disable=g-import-not-at-top

  def term(x):
    s = losses.cosine_similarities(x)
    value, _, _ = losses.triplet_terms(s[0, 1], s[0, 2], method=loss, lam=lam,
                                       temperature=temperature, hard_threshold=hard_threshold)
    return value

  def one(x):
    grad = jax.grad(term)(x)
    before = losses.cosine_similarities(x)
    after = losses.cosine_similarities(x - lr * grad)
    return after[0, 1] - before[0, 1], after[0, 2] - before[0, 2], grad

  return jax.jit(jax.vmap(one))


def similarity_step(vectors: Any, *, loss: str, lr: float, lam: float = 1.0,
                    temperature: float = 0.1,
                    hard_threshold: float = 0.8) -> tuple[Any, Any, Any]:
  """One gradient step of the triplet term on (..., 3, 3) rows a, p, n.

  Returns (change of S_ap, change of S_an, gradient), the similarities as
  `losses.cosine_similarities` measures them before and after the step.
  """
  x = np.asarray(vectors, np.float32)
  step = _step_fn(loss, float(lr), float(lam), float(temperature), float(hard_threshold))
  d_ap, d_an, grad = step(x.reshape((-1, 3, 3)))
  lead = x.shape[:-2]
  return (np.asarray(d_ap).reshape(lead), np.asarray(d_an).reshape(lead),
          np.asarray(grad).reshape(x.shape))


def gradient_field(loss: str, *, lr: float = 0.1, projection: float = 0.0, grid: int = 20,
                   lam: float = 1.0, temperature: float = 0.1,
                   hard_threshold: float = 0.8) -> dict[str, Any]:
  """The field as data: s_ap, s_an (ascending), d_ap[i][j], d_an[i][j] for s_an[i], s_ap[j]
  (None where invalid), and the arguments."""
  check_arguments(loss, lr=lr, projection=projection, grid=grid, temperature=temperature)
  axis = np.linspace(0.0, 1.0, grid)
  s_ap, s_an = np.meshgrid(axis, axis)  # [i, j] = (s_an[i], s_ap[j])
  valid = valid_triplets(s_ap, s_an)
  d_ap, d_an, _ = similarity_step(triplet_vectors(s_ap, s_an, projection), loss=loss, lr=lr,
                                  lam=lam, temperature=temperature,
                                  hard_threshold=hard_threshold)
  d_ap, d_an = np.asarray(d_ap, np.float64), np.asarray(d_an, np.float64)

  def rows(d):
    return [[float(d[i, j]) if valid[i, j] else None for j in range(grid)] for i in range(grid)]

  return {
      "s_ap": axis.tolist(), "s_an": axis.tolist(), "d_ap": rows(d_ap), "d_an": rows(d_an),
      "loss": loss, "lr": lr, "projection": projection, "grid": grid, "lam": lam,
      "temperature": temperature, "hard_threshold": hard_threshold,
  }


def check_arguments(loss: str, *, lr: float, projection: float, grid: int,
                    temperature: float) -> None:
  """Raises AnalysisError on the first argument that cannot work."""
  if loss not in losses.METHODS:
    raise AnalysisError(f"--loss={loss}: use one of {', '.join(losses.METHODS)}")
  if not lr > 0:
    raise AnalysisError(f"--lr={lr}: the step size must be positive, e.g. --lr=0.1")
  if not -1 <= projection <= 1:
    raise AnalysisError(f"--projection={projection}: a cosine, between -1 and 1")
  if grid < 2:
    raise AnalysisError(f"--grid={grid}: at least 2 points per axis, e.g. --grid=20")
  if not temperature > 0:
    raise AnalysisError(f"--temperature={temperature}: must be positive")


def plot_field(field: dict[str, Any], out_path: str | Path) -> None:
  """Writes a PNG: the (change of S_ap, change of S_an) arrows, then each change as a map."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib.colors import TwoSlopeNorm  # pylint: disable=g-import-not-at-top

  s_ap, s_an = np.array(field["s_ap"]), np.array(field["s_an"])
  d_ap = np.array(field["d_ap"], dtype=np.float64)  # None -> nan
  d_an = np.array(field["d_an"], dtype=np.float64)
  x, y = np.meshgrid(s_ap, s_an)
  fig, axes = plt.subplots(1, 3, figsize=(16, 5.4))
  ax = axes[0]
  if field["loss"] == "sct":
    hard = (y > x) | (y > field["hard_threshold"])
    ax.contourf(x, y, hard.astype(float), levels=[0.5, 1.5], colors=["#f2d7d5"])
    ax.text(0.03, 0.95, "hard (sct's hard term)", transform=ax.transAxes, fontsize="small",
            va="top")
  if field["loss"] == "shn":
    ax.fill_between([0, 1], [0, 1], [1, 1], color="#e5e5e5")
    ax.text(0.03, 0.95, "shn never mines these negatives", transform=ax.transAxes,
            fontsize="small", va="top")
  magnitude = np.hypot(d_ap, d_an)
  largest = np.nanmax(magnitude) if np.isfinite(magnitude).any() else 0.0
  spacing = float(s_ap[1] - s_ap[0])
  scale = largest / (0.9 * spacing) if largest > 0 else 1.0
  ax.quiver(x, y, d_ap, d_an, magnitude, cmap="viridis", angles="xy", scale_units="xy",
            scale=scale, width=0.004)
  ax.set_title(f"(change of S_ap, change of S_an); longest arrow = {largest:.3g}",
               fontsize="medium")
  norm_lim = np.nanmax(np.abs(np.concatenate([d_ap.ravel(), d_an.ravel()])))
  norm_lim = norm_lim if np.isfinite(norm_lim) and norm_lim > 0 else 1.0
  for ax, d, name in ((axes[1], d_ap, "change of S_ap"), (axes[2], d_an, "change of S_an")):
    image = ax.pcolormesh(x, y, d, shading="nearest", cmap="RdBu",
                          norm=TwoSlopeNorm(0.0, -norm_lim, norm_lim))
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_title(name, fontsize="medium")
  for ax in axes:
    ax.plot([0, 1], [0, 1], color="k", ls="--", lw=1.2, label="S_an = S_ap")
    ax.set(xlabel="S_ap (anchor-positive)", ylabel="S_an (anchor-negative)",
           xlim=(-0.04, 1.04), ylim=(-0.04, 1.04), aspect="equal")
  axes[0].legend(loc="lower right", fontsize="small")
  extra = f", lam {field['lam']}, threshold {field['hard_threshold']}" \
      if field["loss"] == "sct" else ""
  fig.suptitle(f"{field['loss']}: one gradient step of one triplet's term (lr {field['lr']}, "
               f"t {field['temperature']}{extra}, projection {field['projection']}); "
               "blank: no such triplet")
  fig.tight_layout()
  fig.savefig(out_path, dpi=90)
  plt.close(fig)


PROG = "hn_jax.tools.analysis"
COMMANDS = ("gradient_field",)
FLAGS = cli.command_flags()
flags.DEFINE_string("loss", None, "hn, shn or sct.", flag_values=FLAGS)
flags.DEFINE_float("lr", 0.1, "Step size.", flag_values=FLAGS)
flags.DEFINE_float("projection", 0.0, "Cosine between the parts of p and n orthogonal to a.",
                   flag_values=FLAGS)
flags.DEFINE_integer("grid", 20, "Points per axis over [0, 1].", flag_values=FLAGS)
flags.DEFINE_float("lam", 1.0, "sct's hard-term weight.", flag_values=FLAGS)
flags.DEFINE_float("temperature", 0.1, "t.", flag_values=FLAGS)
flags.DEFINE_float("hard_threshold", 0.8, "sct's threshold.", flag_values=FLAGS)
flags.DEFINE_string("out", None, "The figure (FILE.png).", flag_values=FLAGS)
flags.DEFINE_string("json", None, "The field as JSON (FILE.json).", flag_values=FLAGS)


def _analysis(commands: list[str]) -> int:
  if commands != ["gradient_field"]:
    raise AnalysisError(f"give one command, one of {', '.join(COMMANDS)}: python -m {PROG} "
                        "gradient_field --loss=sct --out=FILE.png")
  if not FLAGS.loss or not FLAGS.out:
    raise AnalysisError("gradient_field needs --loss (hn, shn or sct) and --out=FILE.png")
  check_arguments(FLAGS.loss, lr=FLAGS.lr, projection=FLAGS.projection, grid=FLAGS.grid,
                  temperature=FLAGS.temperature)
  for flag, path in (("--out", FLAGS.out), ("--json", FLAGS.json)):
    if path and not Path(path).resolve().parent.is_dir():
      raise AnalysisError(f"{flag}={path}: its folder does not exist; create it first")
  result = gradient_field(FLAGS.loss, lr=FLAGS.lr, projection=FLAGS.projection, grid=FLAGS.grid,
                          lam=FLAGS.lam, temperature=FLAGS.temperature,
                          hard_threshold=FLAGS.hard_threshold)
  plot_field(result, FLAGS.out)
  if FLAGS.json:
    Path(FLAGS.json).write_text(json.dumps(result, allow_nan=False))
  print(f"{PROG}: wrote {FLAGS.out}" + (f" and {FLAGS.json}" if FLAGS.json else ""),
        file=sys.stderr)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """The command line (without the program name): COMMAND [flags]; returns the exit status."""
  return cli.run(_analysis, FLAGS, argv, prog=PROG, doc=__doc__, positional=1,
                 errors=(AnalysisError,))


if __name__ == "__main__":
  sys.exit(main())
