"""The evaluation protocol of a dataset (docs/protocol.md section 6), run on an embedding function.

`RetrievalEvaluator.from_config(config, dataset)` knows what to retrieve from what;
`run(embed)` embeds each split it needs once (`embed(split) -> (N, D)`) and returns the
logged metrics (docs/protocol.md section 7): Recall@K, MAP@R and R-Precision of the test
queries (against the gallery where the dataset has one), chain recall for Hotels-50K, and
training-set R@1 where the protocol logs it. `embed_split` is the embed-a-split loop that
training, `hn_jax.tools.embed` and `hn_jax.tools.search` share.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable, Iterable

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from hn_jax import evaluation, sharding
from hn_jax.data import input_pipeline
from hn_jax.data.datasets import Dataset
from hn_jax.data.splits import Split

NEIGHBOURS = 100  # nearest gallery indices kept per query at each evaluation (Hotels-50K)


@dataclasses.dataclass(frozen=True)
class RetrievalEvaluator:
  """The dataset's protocol; the ranking bounded by `max_bytes` and placed on `mesh`.

  For a dataset with chains (Hotels-50K), each query's `NEIGHBOURS` nearest gallery indices
  are saved by process 0 as `neighbours_dir/epoch_<epoch>.npy` (int32, queries x 100,
  nearest first; the release kept them for later analysis) when `neighbours_dir` is set.
  """

  dataset: Dataset
  max_bytes: int = evaluation.DEFAULT_MAX_BYTES
  mesh: Mesh | None = None
  neighbours_dir: epath.Path | None = None

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, dataset: Dataset, *,
                  mesh: Mesh | None = None,
                  neighbours_dir: str | os.PathLike | None = None) -> "RetrievalEvaluator":
    folder = None if neighbours_dir is None else epath.Path(neighbours_dir)
    return cls(dataset, max_bytes=config.eval_max_bytes, mesh=mesh, neighbours_dir=folder)

  def run(self, embed: Callable[[Split], np.ndarray], *, epoch: int = 0) -> dict[str, float]:
    """The logged metrics of the embedding function `embed`."""
    data = self.dataset
    metrics, embedded = {}, {}

    def embedding(split: Split) -> np.ndarray:
      if id(split) not in embedded:
        embedded[id(split)] = embed(split)
      return embedded[id(split)]

    test = embedding(data.test)
    gallery = None if data.gallery is None else embedding(data.gallery)
    gallery_labels = None if data.gallery is None else data.gallery.labels
    budget = {"max_bytes": self.max_bytes, "mesh": self.mesh}
    recalls = evaluation.recall_at_k(test, data.test.labels, data.test_ks, gallery,
                                     gallery_labels, **budget)
    for k, r in recalls.items():
      metrics[f"{data.key}_test_R_{k}"] = r
    precision = evaluation.map_at_r(test, data.test.labels, gallery, gallery_labels, **budget)
    metrics[f"{data.key}_test_MAP_R"] = precision["MAP_R"]
    metrics[f"{data.key}_test_RP"] = precision["RP"]
    if data.chain_ks:
      top = evaluation.top_k_indices(test, gallery, min(NEIGHBOURS, len(gallery)), **budget)
      self._save_neighbours(top, epoch)
      ks = [min(k, top.shape[1]) for k in data.chain_ks]
      chains = evaluation.chain_recall(top, data.test.chains, data.gallery.chains, ks)
      for k, kk in zip(data.chain_ks, ks):
        metrics[f"{data.key}_test_chain_R_{k}"] = chains[kk]
    if data.train_recall:
      train = embedding(data.train)
      metrics[f"{data.key}_train_R_1"] = evaluation.recall_at_k(train, data.train.labels, [1],
                                                                **budget)[1]
    return metrics

  def _save_neighbours(self, top: np.ndarray, epoch: int) -> None:
    if self.neighbours_dir is None or jax.process_index() != 0:
      return
    self.neighbours_dir.mkdir(parents=True, exist_ok=True)
    with (self.neighbours_dir / f"epoch_{epoch}.npy").open("wb") as f:
      np.save(f, top)


def embed_batches(embed_step, state, images: Iterable[np.ndarray], n: int, mesh: Mesh, *,
                  progress: bool = False, total: int | None = None) -> np.ndarray:
  """`embed_step(state, batch)` of every host batch of `images`, the first `n` rows, on every
  process (float32, not normalized)."""
  outputs = []
  stream = input_pipeline.prefetch_to_device(({"images": b} for b in images), mesh)
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    stream = tqdm(stream, total=total, desc="embedding", unit="batch", file=sys.stderr)
  for batch in stream:
    outputs.append(embed_step(state, batch["images"]))
  if not outputs:
    return np.zeros((0, 0), np.float32)
  return np.concatenate([sharding.to_host(o) for o in outputs])[:n]


def embed_split(embed_step, state, split: Split, config: ml_collections.ConfigDict,
                mesh: Mesh, *, progress: bool = False) -> np.ndarray:
  """Embeddings of a whole split, in its order, on every process (float32, not normalized)."""
  rows = input_pipeline.eval_batches(split, config, process_index=jax.process_index(),
                              process_count=jax.process_count())
  return embed_batches(embed_step, state, (b["images"] for b in rows), len(split), mesh,
                       progress=progress, total=-(-len(split) // config.eval_batch_size))
