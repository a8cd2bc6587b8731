"""Exact retrieval metrics by cosine similarity, in sharded blocks of bounded memory.

Every metric here is exact (float32 similarities, no approximate search) and never holds the
whole similarity matrix: the gallery stays on the devices (replicated), the queries go through
in blocks of a fixed shape (the last one padded, so one compilation serves them all) whose
rows are split over the `data` axis of a mesh over all devices of all hosts
(`hn_jax.sharding`). `max_bytes` bounds the similarities in flight, summed over all devices
(default `DEFAULT_MAX_BYTES`, 2 GiB): one block on the devices, or two on the CPU host path.

Recall@K needs no sort. For each query we count the gallery items of *another* label that are
at least as similar as its most similar item of its own label; the query is a hit at K exactly
when that count is below K. One integer per query answers every K at once.

Tie rule (all label-aware metrics here): an item of another label with exactly the same
similarity as an item of the query's label is ranked ahead of it (ties count against the
query), so no metric is ever overstated; a collapsed embedding, where everything ties, has
recall 0 and MAP@R 0. Without a gallery, every query searches the other queries (leave-one-out:
the query itself is never retrieved, but an exact duplicate of it is).

Public API:
  recall_at_k(embeddings, labels, ks, gallery=None, gallery_labels=None, *, max_bytes, mesh)
  first_hit_ranks(queries, query_labels, gallery=None, gallery_labels=None, *, max_bytes, mesh)
  map_at_r(embeddings, labels, gallery=None, gallery_labels=None, *, max_bytes, mesh)
  top_k_indices(queries, gallery, k=100, *, max_bytes, mesh)
  chain_recall(top_indices, query_chains, gallery_chains, ks=(1, 3, 5))

Implementation notes. A block of similarities is one float32 matmul (precision HIGHEST: no
TF32/bf16 passes on accelerators). The best similarity of the query's own label is gathered
from that block at the indices of its label's members (a small table built per block on the
host; a masked pass when a class is very large), and one more pass counts the items below it,
so every comparison uses the same float32 values and the tie rule holds exactly even for
rounded similarities. Gallery items that are bitwise copies of an earlier one get their
similarity columns copied from it: BLAS kernels may round one dot product differently at two
column positions (OpenBLAS does, measured), which would break ties between duplicates at random.
Results depend on the block shape, hence on the mesh, only through float32 rounding (near-ties
at the 1e-8 level); with exactly representable similarities they are identical.

On a CPU mesh the first-hit ranks (recall) are computed by NumPy on the host instead of the
jitted kernels, because that is faster (measured, 2-core AVX2 VM: NumPy's OpenBLAS matmul ~1.3x
XLA:CPU's; XLA:CPU's row reductions over blocks too large for the cache ~5x slower than a
NumPy compare and `count_nonzero` row by row): each process takes its share of the queries
(the simulated devices of one host share its cores anyway), BLAS writes a block of a few hundred
rows while a thread per core ranks the previous block a few rows at a time (in cache), and the
ranks are gathered across processes. The other metrics (MAP@R, top-k) are top-k bound and use
the jitted kernels everywhere. Measured and dropped: fusing the count into the matmul (the best
similarity computed apart, rounding differences resolved by an error bound): no faster on
XLA:CPU, and more complex.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from hn_jax import sharding as sharding_lib

DEFAULT_MAX_BYTES = 2 * 1024**3  # Working memory of one block of similarities (all devices).

# Bytes of working memory per entry of a block (the float32 similarity plus what XLA keeps
# beside it), measured as peak RSS on CPU: ~4 for recall; ~10 for the masked pass used for very
# large classes; ~4.5 for the top-k metrics on CPU, whose accelerator top-k (sort-based for
# large k) is assumed to hold values and indices twice more.
_BYTES_PER_ENTRY = 4
_BYTES_PER_ENTRY_MASKED = 12
_BYTES_PER_ENTRY_TOPK_CPU = 8
_BYTES_PER_ENTRY_TOPK = 20
# Same-label members gathered per query beyond which the member table is not worth it and the
# best correct similarity is found by a masked pass over the block instead.
_MEMBER_TABLE_MAX_FRACTION = 0.25
_MEMBER_TABLE_MIN = 64
# Counts are float32 sums of 0/1; they are exact while the gallery has fewer than 2**24 items.
_MAX_GALLERY = 2**24
# On CPU, blocks of about this many similarities per device (32 MiB, the dev VM's L3) ran
# fastest (measured on 2 cores: bigger blocks spill between the matmul and the count, and
# XLA:CPU's row reductions slow down on them; too few rows starve the matmul).
_CPU_BLOCK_ENTRIES = 2**23
_CPU_MIN_ROWS = 64
# On a CPU mesh, first-hit ranks are computed by NumPy on the host (see the module docstring):
# two buffers of at most this many similarities and rows (the BLAS matmul is fastest with a
# few hundred rows or more), compared against the best correct similarity this many at a time.
_HOST_PATH_ON_CPU = True
_HOST_BLOCK_ENTRIES = 2**27
_HOST_MAX_ROWS = 768
_HOST_SLICE_ENTRIES = 2**21
# Blocks dispatched ahead of the host (bounds the host-to-device inputs in flight).
_IN_FLIGHT = 2


def l2_normalize(x: np.ndarray | jax.Array) -> jax.Array:
  """Rows scaled to unit norm (zero rows stay zero)."""
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@jax.jit
def _normalize(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True)), 1e-12)


def _normalize_host(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.sqrt(np.einsum("ij,ij->i", x, x)), np.float32(1e-12))[:, None]


# ----------------------------------------------------------------------------- validation


def _check_embeddings(name: str, x: Any) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"{name} must be 2-D (items, dim), got shape {x.shape}")
  if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
    raise ValueError(f"{name} must be numeric, got dtype {x.dtype}")
  return x


def _check_labels(name: str, y: Any, n: int, what: str) -> np.ndarray:
  y = np.asarray(y)
  if y.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
  if len(y) != n:
    raise ValueError(f"{n} {what} but {len(y)} {name}")
  if len(y) and not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{name} must be integers, got dtype {y.dtype}")
  return y


def _check_inputs(embeddings, labels, gallery, gallery_labels):
  """Validated (queries, query labels, gallery or None, gallery labels or None)."""
  if (gallery is None) != (gallery_labels is None):
    raise ValueError("pass both gallery and gallery_labels, or neither")
  q = _check_embeddings("embeddings", embeddings)
  qy = _check_labels("labels", labels, len(q), "embeddings")
  if gallery is None:
    return q, qy, None, None
  g = _check_embeddings("gallery", gallery)
  gy = _check_labels("gallery_labels", gallery_labels, len(g), "gallery embeddings")
  if g.shape[1] != q.shape[1]:
    raise ValueError(f"queries have dimension {q.shape[1]} but the gallery {g.shape[1]}")
  if len(g) == 0:
    raise ValueError("the gallery is empty")
  return q, qy, g, gy


def _check_budget(max_bytes: int) -> int:
  if int(max_bytes) <= 0:
    raise ValueError(f"max_bytes must be positive, got {max_bytes}")
  return int(max_bytes)


# ----------------------------------------------------------------------------- the plan


def _dense_labels(qy: np.ndarray, gy: np.ndarray | None):
  """Labels as dense int32 shared by queries and gallery, and the gallery grouped by label.

  Returns (query labels, gallery labels, count, order, start): the gallery items of label l
  are order[start[l]:start[l] + count[l]]. Without a gallery (gy None) the queries are it.
  """
  qy = np.asarray(qy)
  gy = qy if gy is None else np.asarray(gy)
  _, dense = np.unique(np.concatenate([qy, gy]), return_inverse=True)
  dense = dense.reshape(-1)
  query_labels = dense[:len(qy)].astype(np.int32)
  gallery_labels = dense[len(qy):].astype(np.int32)
  num_labels = int(dense.max()) + 1 if len(dense) else 1
  count = np.bincount(gallery_labels, minlength=num_labels)
  order = np.argsort(gallery_labels, kind="stable").astype(np.int32)
  start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
  return query_labels, gallery_labels, count, order, start


def _balanced_block(num_rows: int, max_rows: int, multiple: int = 1) -> int:
  """Rows per block for `num_rows` rows: a multiple of `multiple`, at most `max_rows` (but at
  least `multiple`), in as few blocks as that allows, of equal size."""
  num_rows = max(1, num_rows)
  max_rows = max(multiple, max_rows // multiple * multiple)
  num_blocks = -(-num_rows // max_rows)
  return int(-(-num_rows // (num_blocks * multiple)) * multiple)


class _Plan:
  """What the blocks share: the queries on the host, the gallery (normalized) on the mesh."""

  def __init__(self, q, qy, g, gy, *, mesh, labels=True):
    self.mesh = sharding_lib.create_mesh() if mesh is None else mesh
    self.devices = self.mesh.devices.size
    self.on_cpu = self.mesh.devices.flat[0].platform == "cpu"
    self.exclude_self = g is None
    # Raw float32 on the host; normalized on the devices (the gallery once, queries per block).
    self.q = np.asarray(q, np.float32)
    self.g = self.q if self.exclude_self else np.asarray(g, np.float32)
    self.num_queries, self.num_gallery = len(self.q), len(self.g)
    self.dim = self.q.shape[1]
    if self.num_gallery >= _MAX_GALLERY:
      raise ValueError(f"galleries of {_MAX_GALLERY} items or more are not supported")
    self.members_per_query, self.use_table = 0, False
    if labels:
      self.qy, self.gy, self.count, self.order, self.start = _dense_labels(qy, gy)
      if len(self.count) >= _MAX_GALLERY:
        raise ValueError(f"{_MAX_GALLERY} labels or more are not supported")
      max_members = int(self.count[self.qy].max()) if self.num_queries else 0
      self.use_table = max_members <= max(_MEMBER_TABLE_MIN,
                                           _MEMBER_TABLE_MAX_FRACTION * self.num_gallery)
      self.members_per_query = max(1, max_members) if self.use_table else 1
    self.labels = labels
    self.row_sharding = sharding_lib.batch_sharding(self.mesh)
    self.replicated = sharding_lib.replicated(self.mesh)

  @functools.cached_property
  def duplicates(self) -> tuple[np.ndarray, np.ndarray]:
    """Gallery items identical to an earlier one, and that earlier one (see `_duplicates`)."""
    return _duplicates(self.g)

  @functools.cached_property
  def gallery(self) -> dict[str, jax.Array]:
    """The normalized gallery and its duplicates, replicated on the mesh."""
    duplicates, originals = self.duplicates
    return {"vectors": _normalize(self._put(self.g, self.replicated)),
            "duplicates": self._put(duplicates, self.replicated),
            "originals": self._put(originals, self.replicated)}

  @functools.cached_property
  def gallery_labels(self) -> jax.Array | None:
    return self._put(self.gy, self.replicated) if self.labels else None

  @functools.cached_property
  def host_gallery(self) -> np.ndarray:
    """The normalized gallery in host memory (float32)."""
    return _normalize_host(self.g)

  def block_rows(self, max_bytes: int, bytes_per_row: int, cpu_rows: int, num_rows: int) -> int:
    """Rows per block: within `max_bytes`, at most `cpu_rows` per device on CPU (speed), a
    multiple of the device count, and as few equal blocks as that allows for `num_rows` rows."""
    rows = max(1, max_bytes // max(1, bytes_per_row))
    if self.on_cpu:
      rows = min(rows, self.devices * cpu_rows)
    return _balanced_block(num_rows, rows, self.devices)

  @staticmethod
  def _put(x: np.ndarray, sharding) -> jax.Array:
    # Works on every host of a multi-host mesh: each host holds the whole host array.
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  def _blocks(self, block: int, rows: np.ndarray):
    """(number of real rows, device inputs) for each block of the query indices `rows`."""
    for start in range(0, len(rows), block):
      chunk = rows[start:start + block]
      real = len(chunk)
      chunk = np.concatenate([chunk, np.full(block - real, chunk[-1])])  # pad: repeat the last
      is_real = np.arange(block) < real
      inputs = {"queries": self.q[chunk]}
      inputs["self_index"] = (np.where(is_real, chunk, -1) if self.exclude_self
                              else np.full(block, -1)).astype(np.int32)
      if self.labels:
        labels = np.where(is_real, self.qy[chunk], -1).astype(np.int32)
        inputs["labels"] = labels
        if self.use_table:
          inputs["members"], inputs["valid"] = self._members(labels)
      yield real, {k: self._put(v, self.row_sharding) for k, v in inputs.items()}

  def _members(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gallery indices of each row's label, padded to a fixed width (padding: index 0)."""
    width = self.members_per_query
    counts = np.where(labels >= 0, self.count[np.maximum(labels, 0)], 0)
    offsets = np.arange(width)
    valid = offsets[None, :] < counts[:, None]
    where = self.start[np.maximum(labels, 0)][:, None] + offsets[None, :]
    members = np.where(valid, self.order[np.minimum(where, len(self.order) - 1)], 0)
    return members.astype(np.int32), valid

  def run(self, fn, block: int, rows: np.ndarray | None = None, **static) -> list[np.ndarray]:
    """`fn` on the queries `rows` (default: all) in blocks; its outputs for those rows."""
    rows = np.arange(self.num_queries) if rows is None else np.asarray(rows)
    outputs, pending = [], []
    for real, inputs in self._blocks(block, rows):
      out = fn(inputs, self.gallery, self.gallery_labels, **static)
      pending.append((real, out))
      if len(pending) > _IN_FLIGHT:
        outputs.append(self._fetch(*pending.pop(0)))
    outputs.extend(self._fetch(*p) for p in pending)
    if not outputs:
      return []
    return [np.concatenate(parts) for parts in zip(*outputs)]

  @staticmethod
  def _fetch(real: int, out) -> tuple[np.ndarray, ...]:
    return tuple(sharding_lib.to_host(o)[:real] for o in out)


def _duplicates(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(duplicates, originals), int32: the rows of `x` bitwise equal to an earlier row, and the
  first such row. Their similarity columns are copied from the original's, so that identical
  embeddings tie exactly whatever the matmul kernel (BLAS kernels may round the same dot
  product differently at different column positions)."""
  none = np.zeros(0, np.int32), np.zeros(0, np.int32)
  bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
  if len(bits) < 2:
    return none
  # Equal rows have equal hashes of their first columns; only rows sharing one are compared.
  hashes = np.zeros(len(bits), np.uint64)
  for column in range(min(16, bits.shape[1])):
    hashes = hashes * np.uint64(0x100000001B3) + bits[:, column]
  _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
  candidates = np.flatnonzero(counts[inverse.reshape(-1)] > 1)
  if not len(candidates):
    return none
  _, first, group = np.unique(bits[candidates], axis=0, return_index=True, return_inverse=True)
  originals = candidates[first[group.reshape(-1)]]
  is_copy = originals != candidates
  return candidates[is_copy].astype(np.int32), originals[is_copy].astype(np.int32)


# ----------------------------------------------------------------------------- block kernels


def _similarities(queries, gallery):
  """Cosine similarities of raw query rows with the normalized gallery."""
  queries = _normalize(queries)
  # HIGHEST: plain float32 on every backend (no TF32 / bf16 passes on accelerators).
  sims = jnp.matmul(queries, gallery["vectors"].T, precision=jax.lax.Precision.HIGHEST)
  if gallery["duplicates"].shape[0]:
    sims = sims.at[:, gallery["duplicates"]].set(sims[:, gallery["originals"]])
  return sims


def _count_less(sims, threshold):
  """#{j : sims[i, j] < threshold[i]} per row (a float32 sum: exact below 2**24 items)."""
  return jnp.sum((sims < threshold[:, None]).astype(jnp.float32), axis=1).astype(jnp.int32)


def _best_correct(sims, inputs, gallery_labels, use_table, xp=jnp):
  """Per row: best similarity of the row's label (self excluded), and #members at or above it.

  Returns (best, members_at_or_above): the second counts every gallery item of the row's label
  with similarity >= best, the query itself included (it is a gallery item in self-retrieval).
  `xp` is the array module: jax.numpy in the jitted kernels, NumPy on the CPU host path.
  """
  self_index = inputs["self_index"]
  if use_table:
    members, valid = inputs["members"], inputs["valid"]
    member_sims = xp.take_along_axis(sims, members, axis=1)
    candidate = valid & (members != self_index[:, None])
    best = xp.max(xp.where(candidate, member_sims, -xp.inf), axis=1)
    at_or_above = xp.sum(valid & (member_sims >= best[:, None]), axis=1)
    return best, at_or_above.astype(xp.int32)
  same = inputs["labels"][:, None] == gallery_labels[None, :]
  columns = xp.arange(sims.shape[1], dtype=xp.int32)
  not_self = columns[None, :] != self_index[:, None]
  best = xp.max(xp.where(same & not_self, sims, -xp.inf), axis=1)
  at_or_above = xp.sum(same & (sims >= best[:, None]), axis=1)
  return best, at_or_above.astype(xp.int32)


def _first_hit(best, correct_ahead, count_less, num_gallery, xp=jnp):
  """Rank of the first correct item: the items at or above `best` that are neither of the
  query's label nor the query itself; the gallery size when its label has no other item."""
  return xp.where(best > -xp.inf, num_gallery - count_less - correct_ahead, num_gallery)


@functools.partial(jax.jit, static_argnames=("use_table",))
def _first_hit_block(inputs, gallery, gallery_labels, *, use_table):
  sims = _similarities(inputs["queries"], gallery)
  best, correct_ahead = _best_correct(sims, inputs, gallery_labels, use_table)
  return (_first_hit(best, correct_ahead, _count_less(sims, best), sims.shape[1]),)


def _count_not_equal(sims, value):
  """#{j : sims[i, j] != value[i]} per row (a float32 sum: exact below 2**24 items)."""
  return jnp.sum((sims != value[:, None]).astype(jnp.float32), axis=1).astype(jnp.int32)


def _topk_bytes_per_entry(plan: _Plan) -> int:
  return _BYTES_PER_ENTRY_TOPK_CPU if plan.on_cpu else _BYTES_PER_ENTRY_TOPK


def _top_k(sims, k):
  # The barrier keeps XLA from fusing consumers into the top-k, which would turn it into a
  # full sort of every row (measured: 100x slower on CPU).
  return jax.lax.optimization_barrier(jax.lax.top_k(sims, k))


@functools.partial(jax.jit, static_argnames=("use_table", "k"))
def _map_at_r_block(inputs, gallery, gallery_labels, *, use_table, k):
  """Per row: whether each of the first k ranked places is correct (ties against), and R."""
  sims = _similarities(inputs["queries"], gallery)
  labels, self_index = inputs["labels"], inputs["self_index"]
  num_gallery = sims.shape[1]
  if use_table:
    members, valid = inputs["members"], inputs["valid"]
    candidate = valid & (members != self_index[:, None])
    member_sims = jnp.take_along_axis(sims, members, axis=1)
  else:
    columns = jnp.arange(num_gallery, dtype=jnp.int32)
    candidate = ((labels[:, None] == gallery_labels[None, :])
                 & (columns[None, :] != self_index[:, None]))
    member_sims = sims
  r = jnp.sum(candidate, axis=1)  # R: items of the query's label other than itself
  # One more than k when the query itself is in the gallery: it is dropped from the list.
  extra = min(1, num_gallery - k)
  values, index = _top_k(sims, k + extra)
  is_self = index == self_index[:, None]
  values = jnp.where(is_self, -jnp.inf, values)
  correct = (gallery_labels[index] == labels[:, None]) & ~is_self
  # Equal values: wrong before correct (ties count against the query); the query itself last.
  negated, correct = jax.lax.sort((-values, correct.astype(jnp.int32)), dimension=1, num_keys=2)
  values, correct = -negated[:, :k], correct[:, :k] == 1
  last = values[:, -1]
  # Items tied with the k-th value may lie beyond the top k: that whole tie group is ordered
  # wrong first, so count it over the whole row (the query itself left out).
  num_greater = jnp.sum(values > last[:, None], axis=1)
  self_sim = jnp.take_along_axis(sims, jnp.maximum(self_index, 0)[:, None], axis=1)[:, 0]
  self_tied = (self_index >= 0) & (self_sim == last)
  tied = num_gallery - _count_not_equal(sims, last) - self_tied.astype(jnp.int32)
  tied_correct = jnp.sum(candidate & (member_sims == last[:, None]), axis=1)
  tied_wrong = tied - tied_correct
  position = jnp.arange(k)
  hit = jnp.where(position[None, :] < num_greater[:, None], correct,
                  position[None, :] - num_greater[:, None] >= tied_wrong[:, None])
  hit = hit & (position[None, :] < r[:, None])
  return hit, r  # AP@R and R-Precision follow on the host, in float64


@functools.partial(jax.jit, static_argnames=("k",))
def _top_k_block(inputs, gallery, gallery_labels, *, k):
  del gallery_labels
  return (_top_k(_similarities(inputs["queries"], gallery), k)[1],)


def lower_kernels(num_queries: int, num_gallery: int | None, dim: int, *, mesh: Mesh,
                  max_bytes: int = DEFAULT_MAX_BYTES, k: int = 100
                  ) -> dict[str, tuple[Any, int]]:
  """The device kernels of `recall_at_k`, `map_at_r` (with top `k`) and `top_k_indices` at
  these sizes, lowered for `mesh` (its devices may be compile-only): {name: (lowered, rows of a
  block per device)}. What `hn_jax.preflight` compiles. The same-label pass is the masked one,
  the larger in memory of the two a plan may choose, so the figures are upper bounds.
  """
  devices = mesh.devices.size
  leave_one_out = num_gallery is None
  num_gallery = num_queries if leave_one_out else num_gallery
  row = sharding_lib.batch_sharding(mesh)
  replicated = sharding_lib.replicated(mesh)

  def block_inputs(block: int) -> dict[str, jax.ShapeDtypeStruct]:
    return {"queries": jax.ShapeDtypeStruct((block, dim), jnp.float32, sharding=row),
            "self_index": jax.ShapeDtypeStruct((block,), jnp.int32, sharding=row),
            "labels": jax.ShapeDtypeStruct((block,), jnp.int32, sharding=row)}

  gallery = {"vectors": jax.ShapeDtypeStruct((num_gallery, dim), jnp.float32,
                                             sharding=replicated),
             "duplicates": jax.ShapeDtypeStruct((0,), jnp.int32, sharding=replicated),
             "originals": jax.ShapeDtypeStruct((0,), jnp.int32, sharding=replicated)}
  gallery_labels = jax.ShapeDtypeStruct((num_gallery,), jnp.int32, sharding=replicated)

  def rows(bytes_per_row: int) -> int:
    return _balanced_block(num_queries, max(1, max_bytes // bytes_per_row), devices)

  k = max(1, min(k, num_gallery - 1))
  recall = rows(_BYTES_PER_ENTRY_MASKED * num_gallery)
  ranked = rows(_BYTES_PER_ENTRY_TOPK * num_gallery + 24 * k)
  programs = {
      "recall": (_first_hit_block.lower(block_inputs(recall), gallery, gallery_labels,
                                        use_table=False), recall // devices),
      "map_at_r": (_map_at_r_block.lower(block_inputs(ranked), gallery, gallery_labels,
                                         use_table=False, k=k), ranked // devices)}
  if not leave_one_out:
    programs["top_k"] = (_top_k_block.lower(block_inputs(ranked), gallery, gallery_labels,
                                            k=k), ranked // devices)
  return programs


# ----------------------------------------------------------------------------- public API


def first_hit_ranks(queries: np.ndarray, query_labels: np.ndarray,
                    gallery: np.ndarray | None = None, gallery_labels: np.ndarray | None = None,
                    *, max_bytes: int = DEFAULT_MAX_BYTES, mesh: Mesh | None = None
                    ) -> np.ndarray:
  """For each query, the 0-based rank of its first correct item in the gallery.

  The rank is the number of gallery items of another label whose similarity is >= that of the
  most similar item of the query's label (ties count against the query). Without a gallery,
  every query searches the other queries (leave-one-out). Queries with no correct item get the
  gallery size. The block of similarities in flight stays under `max_bytes` (summed over the
  devices of `mesh`, default: all devices), except that a block has at least one row per device.
  """
  q, qy, g, gy = _check_inputs(queries, query_labels, gallery, gallery_labels)
  max_bytes = _check_budget(max_bytes)
  if len(q) == 0:
    return np.zeros((0,), np.int64)
  plan = _Plan(q, qy, g, gy, mesh=mesh)
  return _ranks(plan, max_bytes)


def _ranks(plan: _Plan, max_bytes: int, rows: np.ndarray | None = None) -> np.ndarray:
  """First-hit ranks (int64) of the queries `rows` (default: all), one block at a time."""
  rows = np.arange(plan.num_queries) if rows is None else rows
  if plan.on_cpu and _HOST_PATH_ON_CPU:
    return _host_ranks(plan, max_bytes, rows)
  per_entry = _BYTES_PER_ENTRY if plan.use_table else _BYTES_PER_ENTRY_MASKED
  block = plan.block_rows(max_bytes, per_entry * plan.num_gallery + 9 * plan.members_per_query,
                          _cpu_rows(plan), len(rows))
  (ranks,) = plan.run(_first_hit_block, block, rows, use_table=plan.use_table)
  return ranks.astype(np.int64)


def _cpu_rows(plan: _Plan) -> int:
  """Rows per device of a block of similarities on CPU (measured fastest around 2**23)."""
  return max(_CPU_MIN_ROWS, _CPU_BLOCK_ENTRIES // plan.num_gallery)


# ----------------------------------------------------------------------------- the CPU path


def _host_ranks(plan: _Plan, max_bytes: int, rows: np.ndarray) -> np.ndarray:
  """`_ranks` on a CPU mesh: each process ranks its share of `rows` with NumPy, in blocks."""
  mine = rows[sharding_lib.process_rows(len(rows))]
  gallery, num_gallery = plan.host_gallery, plan.num_gallery
  duplicates, originals = plan.duplicates
  bytes_per_row = 2 * 4 * num_gallery + 9 * plan.members_per_query  # two buffers
  block = _balanced_block(len(mine), min(max_bytes // bytes_per_row,
                                         _HOST_BLOCK_ENTRIES // num_gallery, _HOST_MAX_ROWS))
  # Two buffers: the threads rank one block while BLAS computes the next.
  buffers = [np.empty((min(block, len(mine)), num_gallery), np.float32) for _ in range(2)]
  ranks = np.empty(len(mine), np.int64)
  workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  workers = max(1, workers or 1)

  def collect(start, jobs):
    parts = [job.result() for job in jobs]
    ranks[start:start + sum(len(p) for p in parts)] = np.concatenate(parts)

  pending = None
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for number, start in enumerate(range(0, len(mine), block)):
      chunk = mine[start:start + block]
      sims = buffers[number % 2][:len(chunk)]
      np.matmul(_normalize_host(plan.q[chunk]), gallery.T, out=sims)
      if len(duplicates):
        sims[:, duplicates] = sims[:, originals]
      if pending is not None:
        collect(*pending)
      labels = plan.qy[chunk]
      inputs = {"labels": labels,
                "self_index": chunk if plan.exclude_self else np.full(len(chunk), -1)}
      if plan.use_table:
        inputs["members"], inputs["valid"] = plan._members(labels)
      slices = [s for s in np.array_split(np.arange(len(chunk)), workers) if len(s)]
      pending = (start, [
          pool.submit(_host_first_hit, sims[s[0]:s[-1] + 1],
                      {k: v[s[0]:s[-1] + 1] for k, v in inputs.items()}, plan.gy,
                      plan.use_table)
          for s in slices])
    if pending is not None:
      collect(*pending)
  return sharding_lib.gather_process_rows(ranks, len(rows))


def _host_first_hit(sims: np.ndarray, inputs: dict[str, np.ndarray],
                    gallery_labels: np.ndarray, use_table: bool) -> np.ndarray:
  """First-hit ranks of rows of similarities, by `_first_hit_block`'s rule in NumPy, a few rows
  at a time (so that the comparisons stay in cache)."""
  num_rows, num_gallery = sims.shape
  step = max(1, _HOST_SLICE_ENTRIES // num_gallery)
  below = np.empty((step, num_gallery), bool)
  ranks = np.empty(num_rows, np.int64)
  for a in range(0, num_rows, step):
    b = min(a + step, num_rows)
    s = sims[a:b]
    best, correct_ahead = _best_correct(s, {k: v[a:b] for k, v in inputs.items()},
                                        gallery_labels, use_table, xp=np)
    np.less(s, best[:, None], out=below[:b - a])
    # Row by row: count_nonzero of a 1-D bool array is ~7x faster than with `axis`.
    count_less = np.array([np.count_nonzero(row) for row in below[:b - a]], np.int64)
    ranks[a:b] = _first_hit(best, correct_ahead, count_less, num_gallery, xp=np)
  return ranks


def recall_at_k(embeddings: np.ndarray, labels: np.ndarray, ks: Sequence[int],
                gallery: np.ndarray | None = None, gallery_labels: np.ndarray | None = None,
                *, max_bytes: int = DEFAULT_MAX_BYTES, mesh: Mesh | None = None
                ) -> dict[int, float]:
  """Recall@K by cosine similarity: leave-one-out within `embeddings`, or against `gallery`.

  A query is a hit at K when fewer than K gallery items of another label are at least as
  similar as its most similar item of its own label. Ties count against the query: an item of
  another label with exactly the same similarity as the best correct item is ranked ahead of
  it, so a collapsed embedding (all similarities equal) has recall 0. A query whose label has
  no other item in the gallery is always a miss (it stays in the denominator). Exact at any
  scale: only a block of queries' similarities (at most `max_bytes`, default 2 GiB, summed over
  the devices) is held at once; query blocks are split over all devices of `mesh` (default:
  every device of every host) and the gallery is replicated. Returns {K: recall}; with no
  queries every recall is 0.0.
  """
  ks = [int(k) for k in ks]
  if any(k < 1 for k in ks):
    raise ValueError(f"every K must be at least 1, got {ks}")
  ranks = first_hit_ranks(embeddings, labels, gallery, gallery_labels, max_bytes=max_bytes,
                          mesh=mesh)
  return {k: float(np.mean(ranks < k)) if len(ranks) else 0.0 for k in ks}


def map_at_r(embeddings: np.ndarray, labels: np.ndarray, gallery: np.ndarray | None = None,
             gallery_labels: np.ndarray | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES,
             mesh: Mesh | None = None) -> dict[str, float]:
  """MAP@R and R-Precision (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020).

  For a query, R is the number of other items of its label in the gallery; R-Precision is the
  fraction of its R nearest items that are of its label, and AP@R is the sum, over the correct
  positions i <= R, of precision@i, divided by R. Returns {"MAP_R": mean AP@R, "RP": mean
  R-Precision} over the queries with R >= 1 (queries whose label has no other item are left
  out, as pytorch-metric-learning does; NaN for both if no query has R >= 1). Same tie rule as
  `recall_at_k`: among items of equal similarity, those of another label come first, also at
  the R-th place. Leave-one-out without a gallery. Each block runs `jax.lax.top_k` with
  k = the largest R, so the working memory per query row grows with the largest class; it is
  counted in `max_bytes`.
  """
  q, qy, g, gy = _check_inputs(embeddings, labels, gallery, gallery_labels)
  nan = {"MAP_R": float("nan"), "RP": float("nan")}
  if len(q) == 0:
    return nan
  budget = _check_budget(max_bytes)
  # The largest R decides k (one compiled shape for all blocks).
  query_labels, _, count, _, _ = _dense_labels(qy, gy)
  k = int((count[query_labels] - (1 if g is None else 0)).max())
  if k < 1:
    return nan
  plan = _Plan(q, qy, g, gy, mesh=mesh)
  per_entry = max(_topk_bytes_per_entry(plan),
                  _BYTES_PER_ENTRY if plan.use_table else _BYTES_PER_ENTRY_MASKED)
  block = plan.block_rows(budget, per_entry * plan.num_gallery + 24 * k
                          + 9 * plan.members_per_query, _cpu_rows(plan), plan.num_queries)
  hit, r = plan.run(_map_at_r_block, block, use_table=plan.use_table, k=k)
  keep = r >= 1
  hit, r = hit[keep], r[keep].astype(np.float64)
  hits_so_far = np.cumsum(hit, axis=1)
  precision = hits_so_far / np.arange(1, k + 1)
  average_precision = np.sum(np.where(hit, precision, 0.0), axis=1) / r
  r_precision = hits_so_far[:, -1] / r
  return {"MAP_R": float(np.mean(average_precision)), "RP": float(np.mean(r_precision))}


def top_k_indices(queries: np.ndarray, gallery: np.ndarray, k: int = 100, *,
                  max_bytes: int = DEFAULT_MAX_BYTES, mesh: Mesh | None = None) -> np.ndarray:
  """Each query's `k` most similar gallery items (cosine), nearest first: int32 (Q, k).

  Equal similarities: the lower gallery index first. Blocks as in `recall_at_k`.
  """
  q = _check_embeddings("queries", queries)
  g = _check_embeddings("gallery", gallery)
  if g.shape[1] != q.shape[1]:
    raise ValueError(f"queries have dimension {q.shape[1]} but the gallery {g.shape[1]}")
  if not 1 <= int(k) <= len(g):
    raise ValueError(f"k must be between 1 and the gallery size {len(g)}, got {k}")
  if len(q) == 0:
    return np.zeros((0, int(k)), np.int32)
  plan = _Plan(q, None, g, None, mesh=mesh, labels=False)
  block = plan.block_rows(_check_budget(max_bytes),
                          _topk_bytes_per_entry(plan) * plan.num_gallery + 8 * int(k),
                          _cpu_rows(plan), plan.num_queries)
  (indices,) = plan.run(_top_k_block, block, k=int(k))
  return indices.astype(np.int32)


def chain_recall(top_indices: np.ndarray, query_chains: np.ndarray, gallery_chains: np.ndarray,
                 ks: Sequence[int] = (1, 3, 5)) -> dict[int, float]:
  """Hotels-50K chain Recall@K from each query's nearest gallery indices (nearest first).

  Only queries of a known chain (chain >= 0; -1 means unknown) count; such a query is a hit at
  K when any of its K nearest gallery items has its chain. NaN for every K if no query has a
  known chain.
  """
  top = np.asarray(top_indices)
  query_chains = np.asarray(query_chains)
  gallery_chains = np.asarray(gallery_chains)
  if top.ndim != 2:
    raise ValueError(f"top_indices must be 2-D (queries, k), got shape {top.shape}")
  if query_chains.shape != (len(top),):
    raise ValueError(f"{len(top)} rows of top_indices but query_chains of shape "
                     f"{query_chains.shape}")
  if gallery_chains.ndim != 1:
    raise ValueError(f"gallery_chains must be 1-D, got shape {gallery_chains.shape}")
  if top.size and (top.min() < 0 or top.max() >= len(gallery_chains)):
    raise ValueError(f"top_indices must index the {len(gallery_chains)} gallery items")
  ks = [int(k) for k in ks]
  if any(not 1 <= k <= top.shape[1] for k in ks):
    raise ValueError(f"every K must be between 1 and {top.shape[1]}, got {ks}")
  known = query_chains >= 0
  if not known.any():
    return {k: float("nan") for k in ks}
  chains = query_chains[known][:, None]
  found = gallery_chains[top[known]] == chains  # (known queries, k)
  first = np.where(found.any(axis=1), found.argmax(axis=1), top.shape[1])
  return {k: float(np.mean(first < k)) for k in ks}
