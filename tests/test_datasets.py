"""The five builders on tiny fakes of their published layouts: prepare, load, stream, evaluate.

Each fake (hn_jax/testing/fake_datasets.py) holds a missing file, a truncated JPEG, a file that
is not an image, a grayscale and a CMYK JPEG, a PNG, a class with a single image and an
empty class. No test touches the network: sockets are refused while TFDS runs.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from hn_jax import evaluators
from hn_jax.data import datasets, input_pipeline, samplers, splits, tf_pipeline
from hn_jax.data.tfds_builders import LayoutError
from hn_jax.testing import fake_datasets as fakes
from hn_jax.tools import prepare

REPO = Path(__file__).resolve().parents[1]
NAMES = ["cub", "cars", "sop", "inshop", "hotels50k"]
SPLITS = {"inshop": ("train", "query", "gallery")}


def _refuse(*args, **kwargs):
  raise AssertionError(f"a test tried to reach the network: {args}")

# One dataset in the quick tier, the others in the full suite (each test reads every layout).
ONE_QUICK = [NAMES[0], *[pytest.param(n, marks=pytest.mark.slow) for n in NAMES[1:]]]

@pytest.fixture(scope="module", autouse=True)
def no_network():
  """Any attempt to open a connection fails the test (module-wide, fixtures included)."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(socket.socket, "connect", _refuse)
    patch.setattr(socket, "create_connection", _refuse)
    yield


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, no_network):
  """name -> (Expected, data_dir, builder) for every fake, each prepared once."""
  out = {}
  for name in NAMES + ["cars_devkit"]:
    raw = tmp_path_factory.mktemp(f"raw_{name}")
    data_dir = tmp_path_factory.mktemp(f"data_{name}")
    if name == "cars_devkit":
      expected = fakes.write_cars(str(raw), devkit=True)
      builder = prepare.prepare("cars", expected.root, str(data_dir), progress=False)
    else:
      expected = fakes.WRITERS[name](str(raw))
      builder = prepare.prepare(name, expected.root, str(data_dir), progress=False)
    out[name] = (expected, str(data_dir), builder)
  return out


def _config(name, data_dir, **overrides):
  config = ml_collections.ConfigDict(dict(
      dataset=name, data_dir=data_dir, seed=0, sampler="filled", images_per_class=2, repeat=2,
      batch_size=8, image_size=16, eval_batch_size=8, mean=(0.5, 0.5, 0.5),
      std=(0.25, 0.25, 0.25), cache="off"))
  config.update(overrides)
  return config


@pytest.mark.parametrize("name", NAMES + ["cars_devkit"])
def test_prepare_writes_the_sound_images_in_order(prepared, name):
  expected, _, builder = prepared[name]
  metadata = builder.info.metadata
  splits = SPLITS.get(name, ("train", "test"))
  assert sorted(metadata["splits"]) == sorted(splits)
  for split in splits:
    table = metadata["splits"][split]
    assert builder.info.splits[split].num_examples == len(expected.splits[split])
    assert list(zip(table["labels"], table["image_ids"])) == expected.splits[split], split
    if expected.chains:
      assert table["chains"] == expected.chains[split]
  skipped = {path: reason for path, reason in metadata["skipped"]}
  assert skipped == expected.skipped
  warnings = [(where, what) for where, what in metadata["warnings"]]
  singles = {int(what.rsplit(" ", 1)[-1].rstrip(")")) for _, what in warnings
             if what.startswith("class with a single image")}
  empties = {int(what.rsplit(" ", 1)[-1].rstrip(")")) for _, what in warnings
             if what.startswith("empty class")}
  assert singles == expected.single and empties == expected.empty
  # Non-RGB images are stored as RGB PNG (the fakes' grayscale and CMYK JPEGs, RGBA PNG).
  notes = sorted(note for _, note in metadata["converted"])
  assert {"converted from JPEG CMYK to PNG", "converted from JPEG L to PNG"} <= set(notes)
  assert set(notes) <= {"converted from JPEG CMYK to PNG", "converted from JPEG L to PNG",
                        "converted from PNG RGBA to PNG"}
  # The prepare report names every skipped file with its reason.
  report = (Path(builder.data_dir) / prepare.REPORT_FILE).read_text()
  for path, reason in expected.skipped.items():
    assert path in report and reason in report


@pytest.mark.parametrize("name", ["cub", "cars", "sop", "inshop"])
def test_splits_are_class_disjoint(prepared, name):
  _, _, builder = prepared[name]
  tables = builder.info.metadata["splits"]
  train = set(tables["train"]["labels"])
  for split in set(tables) - {"train"}:
    assert not train & set(tables[split]["labels"]), split
  if name == "inshop":
    assert set(tables["query"]["labels"]) == set(tables["gallery"]["labels"])


def test_hotels_test_hotels_are_in_the_gallery(prepared):
  _, _, builder = prepared["hotels50k"]
  tables = builder.info.metadata["splits"]
  assert set(tables["test"]["labels"]) <= set(tables["train"]["labels"])
  assert -1 in tables["train"]["chains"] and 7 in tables["test"]["chains"]


def test_both_cars_layouts_give_the_same_splits(prepared):
  annos, devkit = prepared["cars"][2], prepared["cars_devkit"][2]
  for split in ("train", "test"):
    a, b = annos.info.metadata["splits"][split], devkit.info.metadata["splits"][split]
    assert sorted(a["labels"]) == sorted(b["labels"])


@pytest.mark.parametrize("name", ONE_QUICK)
def test_pipeline_streams_prepared_splits(prepared, name):
  _, data_dir, _ = prepared[name]
  config = _config(name, data_dir, sampler="filled" if name in ("cub", "cars") else "sample")
  dataset = datasets.load(config)
  assert dataset.key == datasets.KEYS[name]
  batches = list(input_pipeline.train_batches(dataset.train, config, epoch=1))
  assert len(batches) == samplers.steps_per_epoch(dataset.train.labels, config) > 0
  for batch in batches:
    assert batch["images"].shape == (8, 16, 16, 3) and batch["images"].dtype == np.uint8
    assert np.all(batch["labels"][0::2] == batch["labels"][1::2])
    assert batch["images"].std() > 0
  for split in (dataset.train, dataset.test, dataset.gallery):
    if split is None:
      continue
    rows = list(input_pipeline.eval_batches(split, config))
    labels = np.concatenate([b["labels"] for b in rows])
    mask = np.concatenate([b["mask"] for b in rows])
    np.testing.assert_array_equal(labels[mask], split.labels)
    assert rows[0]["images"].shape == (8, 16, 16, 3)


def test_decoded_images_match_pil(prepared):
  """The pipeline's decoder gives PIL's RGB for every stored image (RGB JPEG or PNG)."""
  from PIL import Image
  import io
  import tensorflow as tf
  expected, data_dir, _ = prepared["cub"]
  split = datasets.load(_config("cub", data_dir)).train
  records = split.images.read(range(len(split)))
  modes = []
  for record in records:
    encoded = tf.io.parse_single_example(record, {"image": tf.io.FixedLenFeature([], tf.string)})
    data = encoded["image"].numpy()
    ours = tf_pipeline.decode_image(data).numpy()
    with Image.open(io.BytesIO(data)) as image:
      modes.append((image.format, image.mode))
      theirs = np.asarray(image.convert("RGB"))
    assert ours.shape == theirs.shape
    # Class (d): two JPEG decoders (TF's and PIL's libjpeg builds: IDCT, chroma upsampling),
    # not this code's rounding; PNGs decode identically. Not re-measured per ISA in the audit.
    assert np.abs(ours.astype(int) - theirs.astype(int)).mean() < 2.0
  assert set(modes) == {("JPEG", "RGB"), ("PNG", "RGB")}, modes


def test_tfds_readers_give_three_channels_and_rgb_jpegs_keep_their_bytes(prepared):
  """Through TFDS's own readers: `as_data_source` (NumPy) and `as_dataset` (tf.data)."""
  import tensorflow as tf
  import tensorflow_datasets as tfds
  from PIL import Image
  import io
  _, _, builder = prepared["cub"]  # gray and CMYK JPEGs, RGB and RGBA PNGs
  reloaded = tfds.builder_from_directory(builder.data_dir)
  converted = {path for path, _ in builder.info.metadata["converted"]}
  from etils import epath
  listing = builder._list(epath.Path(reloaded.info.metadata["root"]))
  paths = {e.image_id: e.path for entries in listing.splits.values() for e in entries}
  image_feature = reloaded.info.features["image"]
  for split in reloaded.info.splits:
    decoded = reloaded.as_data_source(split=split)
    raw = reloaded.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    # tf.data: TFDS's own TensorFlow decoder of the declared feature.
    in_tf = tf.data.Dataset.from_tensor_slices([r["image"] for r in raw]).map(
        image_feature.decode_example)
    for stored, example, tf_image in zip(raw, decoded, in_tf.as_numpy_iterator()):
      assert example["image"].ndim == 3 and example["image"].shape[-1] == 3
      assert tf_image.shape[-1] == 3
      image_id = stored["image_id"]
      path = paths[image_id.decode() if isinstance(image_id, bytes) else image_id]
      with open(path, "rb") as f:
        original = f.read()
      with Image.open(io.BytesIO(original)) as image:
        rgb = image.convert("RGB")
        if path in converted:
          assert stored["image"] != original
          np.testing.assert_array_equal(example["image"], np.asarray(rgb))  # lossless
        else:
          assert (image.format, image.mode) in {("JPEG", "RGB"), ("PNG", "RGB")}
          assert stored["image"] == original


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_cache_gives_the_same_batches(prepared, mode, tmp_path):
  """Cached and uncached batches are the same uint8 crops (both round after the resize),
  up to a pixel whose resized value lies within float rounding of a half grey level."""
  _, data_dir, _ = prepared["cub"]
  plain = datasets.load(_config("cub", data_dir))
  config = _config("cub", data_dir, cache=mode, cache_dir=str(tmp_path))
  cached = datasets.load(config)
  a = list(input_pipeline.train_batches(plain.train, _config("cub", data_dir), epoch=1))
  b = list(input_pipeline.train_batches(cached.train, config, epoch=1))
  b_again = list(input_pipeline.train_batches(cached.train, config, epoch=1))
  for x, y, z in zip(a, b, b_again):
    np.testing.assert_array_equal(x["labels"], y["labels"])
    diff = np.abs(x["images"].astype(int) - y["images"])
    # A pixel differs only where the two float32 resizes straddle a half level (see
    # tests/test_input_pipeline.py's resize bound): at most 1 level, on a small fraction.
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    np.testing.assert_array_equal(y["images"], z["images"])
  e1 = next(input_pipeline.eval_batches(plain.test, _config("cub", data_dir)))
  e2 = next(input_pipeline.eval_batches(cached.test, config))
  np.testing.assert_array_equal(e1["images"], e2["images"])
  assert len(os.listdir(tmp_path)) == 2  # the train and the test split's caches


@pytest.mark.slow
def test_second_evaluation_and_embed_decode_no_image(prepared, tmp_path):
  """A run's first evaluation decodes the split and leaves its caches; evaluating again, in
  this process or another (a fresh dataset), and hn_jax.tools.embed read no record."""
  import jax
  from configs import cub
  from hn_jax import sharding, train, train_step
  from hn_jax.tools import embed
  _, data_dir, _ = prepared["cub"]
  config = cub.get_config()
  # The embed step's program is tests/test_train.py's (shapes, normalization): compiled once.
  config.update(dict(data_dir=data_dir, image_size=16, model="small", pretrained="none",
                     embedding_dim=16, batch_size=8, eval_batch_size=512, num_epochs=0,
                     cache="auto",
                     mean=(0.305, 0.305, 0.305), std=(0.378, 0.378, 0.378)))
  workdir = str(tmp_path / "run")
  before = splits.RecordSource.records_read
  first = train.train_and_evaluate(config, workdir)  # epoch 0's evaluation, checkpoint 0
  assert splits.RecordSource.records_read > before
  read = splits.RecordSource.records_read
  dataset = datasets.load(config)
  mesh = sharding.create_mesh()
  graphdef, state = train_step.create_train_state(
      train_step.init_model(config), train_step.create_optimizer(config, 1))
  state = sharding.replicate(state, mesh)
  embed_fn = train_step.make_embed_step(graphdef, mesh, config)
  evaluator = evaluators.RetrievalEvaluator.from_config(config, dataset, mesh=mesh)
  for _ in range(2):
    again = evaluator.run(lambda split: evaluators.embed_split(embed_fn, state, split, config,
                                                               mesh))
    assert again == pytest.approx(first)
  record = embed.embed_to_file(workdir, str(tmp_path / "test.npz"), split="test",
                               progress=False)
  assert splits.RecordSource.records_read == read
  assert len(record["embeddings"]) == len(dataset.test)
  assert jax.device_count() == mesh.size


def _embed_by_label(split):
  """An 'embedding' that retrieves perfectly: one-hot of the label (chains by hotel)."""
  return np.eye(64, dtype=np.float32)[np.asarray(split.labels) % 64]


@pytest.mark.parametrize("name", ONE_QUICK)
def test_evaluate_reports_the_protocol_keys(prepared, name):
  _, data_dir, _ = prepared[name]
  dataset = datasets.load(_config(name, data_dir))
  metrics = evaluators.RetrievalEvaluator(dataset).run(_embed_by_label)
  key = datasets.KEYS[name]
  expected = {f"{key}_test_R_{k}" for k in datasets.TEST_KS[name]}
  expected |= {f"{key}_test_MAP_R", f"{key}_test_RP"}
  if name in ("cub", "cars", "sop"):
    expected.add(f"{key}_train_R_1")
  if name == "hotels50k":
    expected |= {f"HOTEL_test_chain_R_{k}" for k in (1, 3, 5)}
  assert set(metrics) == expected
  assert metrics[f"{key}_test_R_1"] == 1.0
  assert metrics[f"{key}_test_MAP_R"] == metrics[f"{key}_test_RP"] == 1.0
  if name == "hotels50k":
    assert metrics["HOTEL_test_chain_R_1"] == 1.0


def test_hotels_chain_recall_counts_the_chain_not_the_hotel(prepared):
  _, data_dir, _ = prepared["hotels50k"]
  dataset = datasets.load(_config("hotels50k", data_dir))

  def by_chain(split):  # hotels 100 and 101 share chain 7: one point for the chain
    chains = np.asarray(split.chains)
    return np.eye(16, dtype=np.float32)[np.where(chains < 0, 15, chains % 15)]

  metrics = evaluators.RetrievalEvaluator(dataset).run(by_chain)
  assert metrics["HOTEL_test_chain_R_1"] == 1.0
  assert metrics["HOTEL_test_R_1"] < 1.0  # hotels 100 and 101 are confused


@pytest.mark.parametrize("name", NAMES)
def test_load_without_prepared_data_names_the_command(tmp_path, name, monkeypatch):
  monkeypatch.delenv(datasets.DATA_DIR_ENV, raising=False)
  with pytest.raises(datasets.DataNotPreparedError) as error:
    datasets.load(_config(name, str(tmp_path)))
  message = str(error.value)
  assert "\n" not in message and f"python -m hn_jax.tools.prepare --dataset={name}" in message
  (tmp_path / f"hn_{name}" / "1.0.0").mkdir(parents=True)  # prepared by an older hn_jax
  with pytest.raises(datasets.DataNotPreparedError, match="the copy there is of version 1.0.0"):
    datasets.load(_config(name, str(tmp_path)))
  with pytest.raises(datasets.DataNotPreparedError, match=datasets.DATA_DIR_ENV):
    datasets.load(_config(name, ""))


def test_data_dir_from_the_environment(prepared, monkeypatch):
  _, data_dir, _ = prepared["sop"]
  monkeypatch.setenv(datasets.DATA_DIR_ENV, data_dir)
  assert len(datasets.load(_config("sop", "")).train) == 10


@pytest.mark.parametrize("name,remove,names", [
    ("cub", "CUB_200_2011/images.txt", "images.txt"),
    ("cub", "CUB_200_2011/images", "images"),
    ("cars", "cars196/cars_annos.mat", "cars_annos.mat"),
    ("sop", "Stanford_Online_Products/Ebay_test.txt", "Ebay_test.txt"),
    ("inshop", "inshop/Eval/list_eval_partition.txt", "list_eval_partition.txt"),
    ("hotels50k", "hotels50k/input/dataset/train_set.csv", "train_set.csv"),
    ("hotels50k", "hotels50k/images/test/unoccluded", "unoccluded"),
])
def test_missing_annotation_or_folder_stops_at_once(tmp_path, name, remove, names):
  expected = fakes.WRITERS[name](str(tmp_path / "raw"))
  target = tmp_path / "raw" / remove
  if target.is_dir():
    import shutil
    shutil.rmtree(target)
  else:
    target.unlink()
  with pytest.raises(LayoutError) as error:
    prepare.prepare(name, expected.root, str(tmp_path / "data"), progress=False)
  message = str(error.value)
  assert names in message and "expected" in message and "\n" not in message
  assert not list((tmp_path / "data").glob(f"hn_{name}/*/*.array_record*"))


@pytest.mark.slow
def test_prepare_command_line(tmp_path):
  expected = fakes.write_sop(str(tmp_path / "raw"))
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  command = [sys.executable, "-m", "hn_jax.tools.prepare", "--dataset=sop",
             f"--manual_dir={expected.root}", f"--data_dir={tmp_path / 'data'}"]
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "train: 10 images, 4 classes" in result.stdout
  assert "test: 9 images, 3 classes" in result.stdout
  assert "truncated image: 1" in result.stdout and "missing file: 1" in result.stdout
  assert "hn_sop train" in result.stderr  # the progress bar
  again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
  assert "already prepared" in again.stdout
  bad = subprocess.run(command[:4] + [f"--manual_dir={tmp_path / 'nowhere'}",
                                      f"--data_dir={tmp_path / 'data2'}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0
  last = bad.stderr.strip().splitlines()[-1]
  assert last.startswith("hn_jax.tools.prepare: error: missing folder") and "Traceback" not in bad.stderr


def test_other_image_formats_are_converted(tmp_path):
  expected = fakes.write_sop(str(tmp_path / "raw"))
  # A GIF named .JPG, as some scraped copies have.
  from PIL import Image
  gif = Path(expected.root) / "chair_final" / "1000_0.JPG"
  Image.open(gif).convert("P").save(gif, "GIF")
  builder = prepare.prepare("sop", expected.root, str(tmp_path / "data"), progress=False)
  converted = builder.info.metadata["converted"]
  assert [str(gif), "converted from GIF P to PNG"] in converted
