"""RetrievalEvaluator.run: the logged keys of each protocol, MAP@R, chains and saved neighbours."""

import numpy as np
import pytest

from hn_jax import evaluation, evaluators
from hn_jax.data import datasets
from hn_jax.data.splits import Split


def _split(labels, chains=None):
  labels = np.asarray(labels)
  return Split(np.zeros((len(labels), 4, 4, 3), np.uint8), labels,
               None if chains is None else np.asarray(chains))


@pytest.mark.slow
def test_self_retrieval_keys_and_values():
  rng = np.random.default_rng(0)
  train, test = _split(np.repeat(np.arange(10), 3)), _split(np.repeat(np.arange(12), 4))
  embeddings = {id(train): rng.normal(size=(30, 8)), id(test): rng.normal(size=(48, 8))}
  dataset = datasets.Dataset(key="CUB", train=train, test=test, test_ks=(1, 2, 4, 8),
                             train_recall=True)
  metrics = evaluators.RetrievalEvaluator(dataset).run(lambda split: embeddings[id(split)])
  assert sorted(metrics) == sorted(["CUB_test_R_1", "CUB_test_R_2", "CUB_test_R_4",
                                    "CUB_test_R_8", "CUB_test_MAP_R", "CUB_test_RP",
                                    "CUB_train_R_1"])
  expected = evaluation.map_at_r(embeddings[id(test)], test.labels)
  # Class (c): the same function on the same float64 embeddings (default rel 1e-6 is slack).
  assert metrics["CUB_test_MAP_R"] == pytest.approx(expected["MAP_R"])
  assert metrics["CUB_train_R_1"] == evaluation.recall_at_k(embeddings[id(train)],
                                                            train.labels, [1])[1]
  # The memory budget reaches every metric: a tiny one changes nothing but the block count.
  assert evaluators.RetrievalEvaluator(dataset, max_bytes=1000).run(
      lambda split: embeddings[id(split)]) == metrics
  with pytest.raises(ValueError, match="max_bytes must be positive"):
    evaluators.RetrievalEvaluator(dataset, max_bytes=0).run(lambda split: embeddings[id(split)])


def test_hotels_chain_recall_and_saved_neighbours(tmp_path):
  rng = np.random.default_rng(1)
  gallery = _split(np.repeat(np.arange(40), 3), np.repeat(np.arange(40) % 7 - 1, 3))
  queries = _split(np.arange(30), np.arange(30) % 7 - 1)
  embeddings = {id(gallery): rng.normal(size=(120, 8)), id(queries): rng.normal(size=(30, 8))}
  dataset = datasets.Dataset(key="HOTEL", train=gallery, test=queries, test_ks=(1, 10, 100),
                             train_recall=False, gallery=gallery, chain_ks=(1, 3, 5))
  evaluator = evaluators.RetrievalEvaluator(dataset, neighbours_dir=tmp_path)
  metrics = evaluator.run(lambda split: embeddings[id(split)], epoch=3)
  saved = [np.load(p) for p in sorted(tmp_path.iterdir())]
  assert [p.name for p in tmp_path.iterdir()] == ["epoch_3.npy"]
  assert len(saved) == 1 and saved[0].shape == (30, 100)
  top = saved[0]
  sims = embeddings[id(queries)] @ embeddings[id(gallery)].T
  norms = np.linalg.norm(embeddings[id(queries)], axis=1)[:, None] * np.linalg.norm(
      embeddings[id(gallery)], axis=1)[None, :]
  np.testing.assert_array_equal(top[:, 0], np.argmax(sims / norms, axis=1))
  known = queries.chains >= 0
  for k in (1, 3, 5):
    hit = [(gallery.chains[top[i, :k]] == queries.chains[i]).any() for i in np.flatnonzero(known)]
    assert metrics[f"HOTEL_test_chain_R_{k}"] == pytest.approx(np.mean(hit))  # counts: exact
  assert "HOTEL_train_R_1" not in metrics and "HOTEL_test_R_100" in metrics
