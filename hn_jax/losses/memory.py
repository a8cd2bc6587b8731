"""Cross-batch memory: a loss over the batch against the last `memory_size` embeddings seen.

PML 2.9's CrossBatchMemory (Wang, Zhang, Huang, Scott: "Cross-batch memory for embedding
learning", CVPR 2020): each call first writes the batch (without gradient) into a ring
buffer at the write position, then computes the loss of the batch (queries) against every
filled slot (references), the batch's own slots included, with the pairs of a query and its
own slot removed after mining. The buffer lives in `MemoryState` variables, so a step that
does `nnx.merge` -> call -> `nnx.state(module, MemoryState)` carries it to the next step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hn_jax.losses.geometry import Geometry, MetricLoss, all_pairs
from hn_jax.losses.registry import MemoryState


class CrossBatchMemory(nnx.Module):
  """`loss` (and `miner`) over the batch and a ring buffer of `memory_size` past embeddings.

  State (MemoryState): embeddings (M, D) float32, labels (M,) int32, position (the next
  slot written) and filled (slots holding an embedding), int32 scalars.
  """

  def __init__(self, loss: MetricLoss, *, embedding_size: int, memory_size: int = 1024,
               miner: nnx.Module | None = None):
    if memory_size < 1:
      raise ValueError(f"memory_size must be >= 1, got {memory_size}")
    self.loss = loss
    self.miner = miner
    self.memory_size = memory_size
    self.embeddings = MemoryState(jnp.zeros((memory_size, embedding_size), jnp.float32))
    self.labels = MemoryState(jnp.zeros((memory_size,), jnp.int32))
    self.position = MemoryState(jnp.zeros((), jnp.int32))
    self.filled = MemoryState(jnp.zeros((), jnp.int32))

  def __call__(self, embeddings: jax.Array,
               labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    b, m = embeddings.shape[0], self.memory_size
    if b > m:
      raise ValueError(f"cross-batch memory: the batch ({b}) exceeds memory_size ({m}); "
                       "use a memory at least as large as the global batch")
    slots = (self.position[...] + jnp.arange(b)) % m
    memory = self.embeddings[...].at[slots].set(
        jax.lax.stop_gradient(embeddings).astype(jnp.float32))
    memory_labels = self.labels[...].at[slots].set(labels.astype(jnp.int32))
    filled = jnp.minimum(self.filled[...] + b, m)
    self.embeddings[...] = memory
    self.labels[...] = memory_labels
    self.position[...] = (self.position[...] + b) % m
    self.filled[...] = filled

    geometry = Geometry.of(embeddings, memory)
    empty = (jnp.arange(m) >= filled)[None, :]  # never a candidate
    itself = slots[:, None] == jnp.arange(m)[None, :]  # removed after mining
    if self.miner is None:
      tuples = all_pairs(labels, memory_labels, empty | itself)
      tuples = tuples.replace(neg=jnp.where(empty, 0.0, tuples.neg),
                               tneg=tuples.tneg & ~empty)
    else:
      tuples = self.miner(embeddings, labels, memory, memory_labels, exclude=empty,
                          remove=itself, geometry=geometry)
    loss, aux = self.loss.compute(embeddings, labels, memory, memory_labels, tuples,
                                  batch_columns=slots, geometry=geometry)
    aux = {**aux, "memory_filled": filled.astype(jnp.float32),
           "num_pos_pairs": jnp.sum(tuples.pos), "num_neg_pairs": jnp.sum(tuples.neg)}
    return loss, {k: jax.lax.stop_gradient(jnp.asarray(v, jnp.float32))
                  for k, v in aux.items()}
