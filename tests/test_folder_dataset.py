"""One's own images (config.dataset="folder"): the layouts, the CSV's rules, preparing on first
use (corrupt files skipped and named in one line), a copy per folder, validation, training and
embedding end to end; and the paper datasets' not-prepared message."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from hn_jax import run_config
from hn_jax.data import datasets, tfds_builders
from hn_jax.data.tfds_builders import folder as folder_builder
from hn_jax.data.tfds_builders.common import LayoutError

PIXELS = 12


def _image(seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (PIXELS, PIXELS + 2, 3), np.uint8)


def _write(path, seed: int) -> None:
  """A PNG (lossless: its pixels can be compared) or, for .jpg, a JPEG."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(_image(seed)).save(path)


def _touch(root, *relatives) -> None:
  for relative in relatives:
    path = os.path.join(root, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()


# Listing (no image is read).


def test_class_folders_are_sorted_and_halved(tmp_path):
  _touch(tmp_path, "b/1.jpg", "b/2.JPG", "a/x/deep.png", "a/y.png", "c/1.png", "c/notes.txt",
         "d/1.png", "e/1.png", "e/.hidden.png", "loose.png")
  listing = folder_builder.list_folder(str(tmp_path))
  ids = {s: [(e.image_id, e.label) for e in entries] for s, entries in listing.splits.items()}
  assert ids == {"train": [("a/x/deep.png", 0), ("a/y.png", 0), ("b/1.jpg", 1), ("b/2.JPG", 1),
                           ("c/1.png", 2)],
                 "test": [("d/1.png", 3), ("e/1.png", 4)]}  # 5 classes: 3 train, 2 test
  assert listing.splits["train"][0].path == str(tmp_path / "a" / "x" / "deep.png")
  assert listing.warnings == [(str(tmp_path), "1 image(s) outside a class folder, not used")]


def test_train_and_test_folders_give_the_split(tmp_path):
  _touch(tmp_path, "train/cat/1.png", "train/dog/1.png", "test/dog/2.png", "test/emu/1.png")
  listing = folder_builder.list_folder(str(tmp_path))
  assert [(e.image_id, e.label) for e in listing.splits["train"]] == [("train/cat/1.png", 0),
                                                                      ("train/dog/1.png", 1)]
  assert [(e.image_id, e.label) for e in listing.splits["test"]] == [("test/dog/2.png", 1),
                                                                     ("test/emu/1.png", 2)]


def test_integer_class_names_sort_as_numbers(tmp_path):
  _touch(tmp_path, *(f"{c}/1.png" for c in (10, 9, 2, 1)))
  listing = folder_builder.list_folder(str(tmp_path))
  assert [e.image_id for e in listing.splits["train"]] == ["1/1.png", "2/1.png"]
  assert [e.image_id for e in listing.splits["test"]] == ["9/1.png", "10/1.png"]


def test_too_few_classes_is_one_line(tmp_path):
  _touch(tmp_path, "a/1.png", "b/1.png", "c/1.png")  # test would hold one class
  with pytest.raises(LayoutError, match="the test split has 1 class; each split needs 2") as e:
    folder_builder.list_folder(str(tmp_path))
  assert "\n" not in str(e.value)
  (tmp_path / "empty" / "a").mkdir(parents=True)
  with pytest.raises(LayoutError, match="no image"):
    folder_builder.list_folder(str(tmp_path / "empty"))


def test_csv_paths_labels_and_split(tmp_path):
  (tmp_path / "lists").mkdir()
  csv = tmp_path / "lists" / "all.csv"
  csv.write_text("path,label\nimg/a1.png,zebra\nimg/a2.png,zebra\n./b.png,ant\n"
                 "sub/../c.png,bee\n\nd.png,cat\n")
  listing = folder_builder.list_csv(str(csv))
  assert [(e.image_id, e.label) for e in listing.splits["train"]] == [("b.png", 0), ("c.png", 1)]
  assert [(e.image_id, e.label) for e in listing.splits["test"]] == [
      ("d.png", 2), ("img/a1.png", 3), ("img/a2.png", 3)]  # by class, then path
  assert listing.splits["test"][1].path == str(tmp_path / "lists" / "img" / "a1.png")
  csv.write_text("a.png,x,train\nb.png,y,TRAIN\nc.png,y,test\nd.png,z,test\n")  # no header
  listing = folder_builder.list_csv(str(csv))
  assert [(e.image_id, e.label) for e in listing.splits["test"]] == [("c.png", 1), ("d.png", 2)]


@pytest.mark.parametrize("rows, words", [
    ("/etc/passwd,a\nb.png,b\n", "absolute path '/etc/passwd' refused"),
    ("../outside.png,a\nb.png,b\n", "leaves the CSV file's folder"),
    ("a/../../outside.png,a\nb.png,b\n", "leaves the CSV file's folder"),
    ("~/x.png,a\nb.png,b\n", "absolute path"),
    ("a.png,a,train\nb.png,b\n", "all rows alike"),
    ("a.png,a,val\nb.png,b,test\n", "split 'val' is not train or test"),
    ("a.png,,train\n", "empty label"),
    ("path,label\n", "no rows"),
])
def test_bad_csv_is_one_line(tmp_path, rows, words):
  csv = tmp_path / "list.csv"
  csv.write_text(rows)
  with pytest.raises(LayoutError) as e:
    folder_builder.list_csv(str(csv))
  assert words in str(e.value) and "\n" not in str(e.value) and str(csv) in str(e.value)


# Preparing (TFDS), once per folder.


def _config(source, data_dir, **overrides):
  config = run_config.defaults()
  config.update(dataset="folder", folder=str(source), data_dir=str(data_dir))
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
  """4 classes of 3 PNGs (one a JPEG), plus a corrupt file, a truncated JPEG and an empty one."""
  root = tmp_path_factory.mktemp("photos")
  for c, name in enumerate(["owl", "cat", "dog", "emu"]):
    for i in range(3):
      _write(str(root / name / f"{i}.{'jpg' if i == 2 else 'png'}"), 10 * c + i)
  (root / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
  buffer = io.BytesIO()
  Image.fromarray(_image(99)).save(buffer, "JPEG")
  (root / "dog" / "cut.jpg").write_bytes(buffer.getvalue()[:200])
  (root / "emu" / "empty.jpg").write_bytes(b"")
  return root


@pytest.fixture(scope="module")
def prepared(class_folder, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("prepared")
  return datasets.load(_config(class_folder, data_dir)), data_dir


def test_first_use_prepares_once_and_names_what_it_skipped(class_folder, tmp_path, caplog):
  config = _config(class_folder, tmp_path)
  with caplog.at_level("INFO"):
    dataset = datasets.load(config)
  lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
  assert len(lines) == 1 and "skipped 3 file(s) that could not be read" in lines[0], lines
  for name in ("broken.png", "cut.jpg", "empty.jpg"):
    assert name in lines[0]
  assert any("preparing it once into " in r.getMessage() for r in caplog.records)
  assert dataset.key == "FOLDER" and dataset.train_recall and dataset.gallery is None
  assert dataset.train.labels.tolist() == [0] * 3 + [1] * 3  # cat, dog: train; emu, owl: test
  assert dataset.test.labels.tolist() == [2] * 3 + [3] * 3
  root = datasets.prepared_root(config)
  assert root.startswith(str(tmp_path / "folders" / "photos")) and os.path.isdir(root)
  caplog.clear()
  with caplog.at_level("INFO"):
    again = datasets.load(config)  # prepared: read, not built again
  assert not any("preparing" in r.getMessage() for r in caplog.records)
  assert again.train.identity == dataset.train.identity


def test_image_ids_are_the_relative_paths(prepared, class_folder, tmp_path):
  from hn_jax.tools import embed  # pylint: disable=g-import-not-at-top
  _, data_dir = prepared
  config = _config(class_folder, data_dir)
  assert embed.split_ids(config, "train", 6).tolist() == [
      "cat/0.png", "cat/1.png", "cat/2.jpg", "dog/0.png", "dog/1.png", "dog/2.jpg"]
  assert embed.split_ids(config, "test", 6)[3:].tolist() == ["owl/0.png", "owl/1.png",
                                                             "owl/2.jpg"]


def test_two_folders_do_not_collide(tmp_path):
  a, b = tmp_path / "x" / "photos", tmp_path / "y" / "photos"
  for root, offset in ((a, 0), (b, 50)):
    for c in range(4):
      for i in range(2):
        _write(str(root / f"c{c}" / f"{i}.png"), offset + 10 * c + i)
  data_dir = tmp_path / "prepared"
  first = datasets.load(_config(a, data_dir))
  second = datasets.load(_config(b, data_dir))
  assert datasets.prepared_root(_config(a, data_dir)) != datasets.prepared_root(
      _config(b, data_dir))
  assert first.train.identity != second.train.identity
  assert datasets.folder_dir(str(data_dir), str(a) + "/") == datasets.folder_dir(str(data_dir),
                                                                                 str(a))


def test_a_changed_folder_is_said_in_one_line(tmp_path, caplog):
  for c in range(4):
    for i in range(2):
      _write(str(tmp_path / "photos" / f"c{c}" / f"{i}.png"), 10 * c + i)
  config = _config(tmp_path / "photos", tmp_path / "prepared")
  datasets.load(config)

  def changed() -> list[str]:
    caplog.clear()
    with caplog.at_level("INFO"):
      datasets.load(config)
    return [r.getMessage() for r in caplog.records if "has changed" in r.getMessage()]

  assert changed() == []
  _write(str(tmp_path / "photos" / "c3" / "2.png"), 77)
  (message,) = changed()
  assert "it lists 9 images, the copy has 8" in message and "--overwrite" in message
  assert len(datasets.load(config).test) == 4  # the run goes on with the prepared copy


def test_csv_source_prepares(tmp_path):
  for i in range(8):
    _write(str(tmp_path / "imgs" / f"{i}.png"), i)
  (tmp_path / "list.csv").write_text(
      "path,label,split\n" + "".join(f"imgs/{i}.png,k{i // 2},{'train' if i < 4 else 'test'}\n"
                                     for i in range(8)))
  dataset = datasets.load(_config(tmp_path / "list.csv", tmp_path / "prepared"))
  assert dataset.train.labels.tolist() == [0, 0, 1, 1]
  assert dataset.test.labels.tolist() == [2, 2, 3, 3]


def test_a_refused_csv_stops_preparing_in_one_line(tmp_path):
  (tmp_path / "list.csv").write_text("../a.png,x\n")
  with pytest.raises(datasets.DataNotPreparedError) as e:
    datasets.load(_config(tmp_path / "list.csv", tmp_path / "prepared"))
  message = str(e.value)
  assert message.startswith(f"config.folder={tmp_path / 'list.csv'}: ") and "\n" not in message
  assert "leaves the CSV file's folder" in message
  assert not os.path.exists(datasets.prepared_root(_config(tmp_path / "list.csv",
                                                           tmp_path / "prepared")))


def test_prepare_command_takes_a_folder(class_folder, tmp_path, capsys):
  """`prepare --dataset=folder` builds the copy a run then finds (under the same data_dir)."""
  from hn_jax.tools import prepare  # pylint: disable=g-import-not-at-top
  assert prepare.main(["--dataset=folder", f"--manual_dir={class_folder}",
                       f"--data_dir={tmp_path}"]) == 0
  out = capsys.readouterr().out
  assert "train: 6 images, 2 classes" in out and "skipped: 3" in out
  assert datasets.load(_config(class_folder, tmp_path)).train.labels.tolist() == [0] * 3 + [1] * 3


def test_validation(tmp_path):
  def error(**overrides) -> str:
    config = run_config.defaults()
    config.update(overrides)
    with pytest.raises(run_config.ConfigError) as e:
      run_config.validate(config, num_devices=1, num_processes=1)
    return str(e.value)

  assert "needs --config.folder=DIR" in error(dataset="folder")
  assert "no such folder or file" in error(dataset="folder", folder=str(tmp_path / "nope"))
  assert "is set but config.dataset='digits'" in error(folder=str(tmp_path))
  config = run_config.defaults()
  config.update(dataset="folder", folder=str(tmp_path))
  run_config.validate(config, num_devices=1, num_processes=1)


def test_folder_config_file():
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(__file__), "..", "configs", "folder.py")
  spec = importlib.util.spec_from_file_location("folder_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  assert config.dataset == "folder" and config.folder == "" and config.pretrained == "imagenet"


# The paper datasets: where to get them, what their folder holds, the command.


@pytest.mark.parametrize("name", datasets.PREPARED)
def test_not_prepared_names_homepage_layout_and_command(tmp_path, name, monkeypatch):
  monkeypatch.delenv(datasets.DATA_DIR_ENV, raising=False)
  builder = tfds_builders.BUILDERS[name]
  layout = __import__(builder.__module__, fromlist=["LAYOUT"]).LAYOUT
  for data_dir, command_dir in ((str(tmp_path), str(tmp_path)), ("", "/path/to/prepared")):
    config = run_config.defaults()
    config.update(dataset=name, data_dir=data_dir)
    with pytest.raises(datasets.DataNotPreparedError) as e:
      datasets.load(config)
    message = str(e.value)
    assert "\n" not in message
    assert builder.HOMEPAGE.startswith("https://") and builder.HOMEPAGE in message
    assert layout in message
    assert message.endswith(datasets.prepare_command(name, command_dir))
    assert f"--dataset={name} --manual_dir=/path/to/" in message


# End to end.


@pytest.mark.slow
def test_train_embed_and_search_on_a_folder(prepared, class_folder, tmp_path):
  """One tiny epoch on the folder, then embed its test split and search it; the stored images
  are the files' pixels."""
  from hn_jax import train  # pylint: disable=g-import-not-at-top
  from hn_jax.tools import embed, search  # pylint: disable=g-import-not-at-top
  dataset, data_dir = prepared
  np.testing.assert_array_equal(embed.split_image(dataset.train, 0), _image(10))  # cat/0.png
  np.testing.assert_array_equal(embed.split_image(dataset.test, 4), _image(1))  # owl/1.png
  config = _config(class_folder, data_dir, model="small", image_size=16, embedding_dim=8,
                   batch_size=8, eval_batch_size=8, num_epochs=1, eval_every=1,
                   lr_drop_epochs=(), pretrained="none", cache="off")
  run_config.validate(config, num_devices=8, num_processes=1)
  metrics = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert 0 < metrics["FOLDER_test_R_1"] <= 1 and "FOLDER_train_R_1" in metrics
  index = tmp_path / "index.npz"
  embed.embed_to_file(str(tmp_path / "run"), str(index), split="test", progress=False)
  record = search.load_index(str(index))
  assert record["ids"].tolist()[:3] == ["emu/0.png", "emu/1.png", "emu/2.jpg"]
  assert record["labels"].tolist() == [2] * 3 + [3] * 3
  top, _ = search.nearest(record["embeddings"][4:5], record["embeddings"], 2)
  assert top[0][0] == 4  # a query in the index is its own nearest
