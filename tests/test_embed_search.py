"""Embedding (dataset split and image folder) and search with a tiny trained digits run."""


import numpy as np
import pytest
from PIL import Image

from hn_jax.data import datasets
from hn_jax.testing.runs import tiny_config
from hn_jax.tools import embed, search


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_run):
  """A tiny digits run (tests/conftest.py's, shared: only read here), its test-split index
  and a folder of 12 test digits as PNG."""
  root = tmp_path_factory.mktemp("embed_search")
  workdir = tiny_run[0]
  index_path = root / "test.npz"
  embed.embed_to_file(str(workdir), str(index_path), split="test", progress=False)
  folder = root / "images"
  folder.mkdir()
  test = datasets.load(tiny_config()).test
  chosen = list(range(0, 120, 10))
  for n, i in enumerate(chosen):
    Image.fromarray(test.images[i]).save(folder / f"digit_{n:02d}.png")
  return workdir, index_path, folder, chosen


def test_folder_equals_dataset_path(run):
  workdir, index_path, folder, chosen = run
  out = folder.parent / "folder.npz"
  embed.embed_to_file(str(workdir), str(out), images=str(folder), progress=False)
  folder_index, index = search.load_index(str(out)), search.load_index(str(index_path))
  assert folder_index["kind"] == "folder" and folder_index["embedding_dim"] == 16
  assert [p.rsplit("/", 1)[1] for p in folder_index["ids"]] == [
      f"digit_{n:02d}.png" for n in range(len(chosen))]
  assert (folder_index["labels"] == -1).all()
  assert index["embeddings"].shape == (len(datasets.load(tiny_config()).test), 16)
  assert index["embeddings"].dtype == np.float32
  # Class (a): a float32 normalization of 16 components: |norm - 1| <= ~16 2^-24 = 1e-6.
  np.testing.assert_allclose(np.linalg.norm(index["embeddings"], axis=1), 1, atol=1e-5)
  # Class (a): the same images and weights in other batches (12 vs 512 rows: other conv
  # blocking), unit vectors; float32 reassociation of the backbone's sums, ~1e-6 expected.
  np.testing.assert_allclose(folder_index["embeddings"], index["embeddings"][chosen], atol=1e-5)
  assert index["dataset"] == "digits" and index["split"] == "test"


def test_search_equals_brute_force_and_writes_sheet(run, tmp_path, capsys):
  workdir, index_path, _, _ = run
  sheet = tmp_path / "sheet.png"
  result = search.search(str(index_path), query_split="test", query_indices=[3, 40, 77], k=8,
                         sheet=str(sheet))
  gallery = search.load_index(str(index_path))["embeddings"]
  sims = result["embeddings"] @ gallery.T
  expected = np.argsort(-sims, axis=1, kind="stable")[:, :8]
  np.testing.assert_array_equal(result["top"], expected)
  # Class (a): float32 dots of 16-dim unit vectors in two orders: <= 16 2^-24 = 1e-6 apart.
  np.testing.assert_allclose(result["sims"], np.take_along_axis(sims, expected, 1), atol=1e-5)
  assert result["top"][:, 0].tolist() == [3, 40, 77]  # Each query is in the gallery.
  without = search.search(str(index_path), query_split="test", query_indices=[3, 40, 77], k=8,
                          exclude_self=True)
  masked = sims.copy()
  masked[np.arange(3), [3, 40, 77]] = -np.inf
  np.testing.assert_array_equal(without["top"], np.argsort(-masked, axis=1, kind="stable")[:, :8])
  printed = capsys.readouterr().out
  assert printed.count("query digits:test:") == 6 and "label" in printed
  with Image.open(sheet) as picture:
    assert picture.format == "PNG"
    cell = 96 + 2 * search.FRAME
    assert picture.size == (9 * cell, 3 * cell)


def test_bad_queries_are_reported_and_skipped(run, tmp_path, capsys):
  _, index_path, folder, _ = run
  corrupt = tmp_path / "corrupt.png"
  corrupt.write_bytes(b"this is not a png" * 10)
  missing = tmp_path / "missing.png"
  good = folder / "digit_00.png"
  result = search.search(str(index_path), queries=[str(corrupt), str(missing), str(good)], k=3)
  assert result["ids"] == [str(good)]
  captured = capsys.readouterr()
  assert f"skipped {corrupt}" in captured.err and f"skipped {missing}" in captured.err
  assert f"query {good} (unknown label)" in captured.out


def test_index_of_another_dimension_is_refused(run, tmp_path, capsys):
  workdir, index_path, folder, _ = run
  index = search.load_index(str(index_path))
  index["embeddings"] = np.ones((5, 8), np.float32)
  index["embedding_dim"] = 8
  for key in ("labels", "ids", "chains"):  # a consistent index, of another dimension
    if key in index:
      index[key] = index[key][:5]
  other = tmp_path / "other.npz"
  np.savez(other, **index)
  assert search.main([f"--index={other}", f"--query={folder}", f"--workdir={workdir}"]) == 2
  message = capsys.readouterr().err.strip()
  assert message.startswith("hn_jax.tools.search: error:") and "dimension 8" in message
  assert "dimension 16" in message and "\n" not in message


def test_nearest_without_self_against_numpy():
  """The search's ranking and its self-exclusion on random vectors, no trained run: a float64
  NumPy reference of the cosine similarities, the top k by it (distinct values: no ties)."""
  rng = np.random.default_rng(0)
  gallery = rng.standard_normal((40, 6)).astype(np.float32)
  queries = np.concatenate([gallery[[3, 17]] * 2.5, rng.standard_normal((1, 6))]).astype(
      np.float32)
  top, sims = search.nearest(queries, gallery, 6)
  unit = lambda x: x / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
  reference = unit(queries) @ unit(gallery).T
  np.testing.assert_array_equal(top, np.argsort(-reference, axis=1)[:, :6])
  # Class (a): float32 dots of 6-dim unit vectors: within ~6 2^-24 of float64.
  np.testing.assert_allclose(sims, np.take_along_axis(reference, top, 1), rtol=0, atol=1e-6)
  assert list(top[:2, 0]) == [3, 17], "a scaled copy of a gallery item is its own nearest"
  kept, kept_sims = search._without_self(top, sims, np.array([3, 17, -1]), 5)
  np.testing.assert_array_equal(kept[:2], top[:2, 1:6])
  np.testing.assert_array_equal(kept[2], top[2, :5])
  np.testing.assert_array_equal(kept_sims[:2], sims[:2, 1:6])
