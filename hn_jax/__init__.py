"""hn_jax: "Hard negative examples are hard, but useful" (ECCV 2020) in JAX and Flax."""

from hn_jax import platforms as _platforms

_platforms.use_cpu_without_accelerators()
