"""Train-pipeline throughput: hn_jax's pipelines against a PyTorch DataLoader with PIL.

  python benchmarks/input_pipeline.py [--images=2000] [--workers=N] [--cached_epochs=20]
  python benchmarks/input_pipeline.py --smoke   # 64 images, batch 8, 32 px: tests the script

Writes CUB-like JPEGs (500 x 375 or 375 x 500, quality 90, cut from scikit-learn's two sample
photos at random scales and offsets) in the CUB layout, prepares them with `hn_jax.tools.prepare`,
then times training epochs of each pipeline on the same index stream (the `filled` sampler),
batch 128, image size 256 (`--batch`, `--image_size`), the paper's transforms, in the form the step consumes:

- hn_jax uncached: `input_pipeline.train_batches` with `cache=off`, tf.data reading the
  ArrayRecord files, uint8 crops (one epoch, after a warm-up epoch);
- hn_jax before issue 13: the same tf.data graph as it was (TF stateless random ops, float32
  normalized on the host), for "no slower than before" in the same run;
- hn_jax cached: `cache=memory` and `cache=disk` (memory-mapped), uint8 crops cut by NumPy
  from the decoded images (built once, timed separately, then `cached_epochs` epochs), with
  `input_pipeline.CACHE_THREADS` threads (1 on 2 cores) and, for comparison, with 2 (or 1);
- PyTorch: a `DataLoader` with `workers` processes, each image read from its file and
  transformed with PIL by hand as torchvision would (torchvision is not installed): resize the
  shorter side to 281 (bilinear), random 256 crop, random flip, to tensor, normalize.

Reports images/s (wall), per core (wall / the cores the pipeline uses: all of them for
tf.data and PyTorch, its threads for the cache) and images per CPU-second (the CPU time of
every thread and worker process), with the load average beside them: on a shared machine
the figures drop.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MEAN = (0.4707, 0.4601, 0.4549)
STD = (0.2767, 0.2760, 0.2850)
UNCACHED = "hn_jax tf.data (ArrayRecord), uint8"
LEGACY = "hn_jax tf.data (ArrayRecord), before: float32"
TORCH = "PyTorch DataLoader + PIL"


def write_cub_like(root: str, num_images: int, seed: int = 0) -> str:
  """A CUB layout of `num_images` CUB-sized JPEGs in up to 100 train and 100 test classes
  (4 images a class at least)."""
  from PIL import Image
  from sklearn.datasets import load_sample_image

  rng = np.random.default_rng(seed)
  photos = [Image.fromarray(load_sample_image(n)) for n in ("china.jpg", "flower.jpg")]
  cub = os.path.join(root, "CUB_200_2011")
  lines, labels = [], []
  half = min(100, max(1, num_images // 8))  # classes of each split (CUB: ids 1-100 train)
  for i in range(num_images):
    c = i % (2 * half)
    class_id = 1 + c if c < half else 101 + c - half
    folder = f"{class_id:03d}.Class_{class_id}"
    photo = photos[i % 2]
    scale = rng.uniform(0.6, 1.0)
    w, h = int(photo.width * scale), int(photo.height * scale)
    left, top = rng.integers(0, photo.width - w + 1), rng.integers(0, photo.height - h + 1)
    size = (500, 375) if i % 4 else (375, 500)
    image = photo.crop((left, top, left + w, top + h)).resize(size, Image.BILINEAR)
    os.makedirs(os.path.join(cub, "images", folder), exist_ok=True)
    name = f"{folder}/img_{i:05d}.jpg"
    image.save(os.path.join(cub, "images", name), "JPEG", quality=90)
    lines.append(f"{i + 1} {name}\n")
    labels.append(f"{i + 1} {class_id}\n")
  with open(os.path.join(cub, "images.txt"), "w") as f:
    f.writelines(lines)
  with open(os.path.join(cub, "image_class_labels.txt"), "w") as f:
    f.writelines(labels)
  with open(os.path.join(cub, "classes.txt"), "w") as f:
    f.writelines(f"{c} {c:03d}.Class_{c}\n" for c in range(1, 201))
  return cub


def cpu_seconds() -> float:
  """CPU time of this process's threads and of its finished (waited-for) children."""
  own = resource.getrusage(resource.RUSAGE_SELF)
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_hn_jax(config, dataset, epochs: int = 1, batches=None) -> dict[str, float]:
  from hn_jax.data import input_pipeline

  batches = batches or input_pipeline.train_batches
  # Warm up (and fill the cache) on epoch 1, timed apart; time the next `epochs`.
  start = time.perf_counter()
  for _ in batches(dataset.train, config, epoch=1):
    pass
  first = time.perf_counter() - start
  start, cpu = time.perf_counter(), cpu_seconds()
  images = 0
  for epoch in range(2, 2 + epochs):
    for batch in batches(dataset.train, config, epoch=epoch):
      assert batch["images"].dtype == (np.float32 if batches is legacy_batches else np.uint8)
      images += len(batch["images"])
  return {"images": images, "wall": time.perf_counter() - start, "cpu": cpu_seconds() - cpu,
          "first_epoch_s": first}


def time_host_flip(cache, batch: int, size: int, batches: int = 20) -> dict[str, float]:
  """Crops per second cut from a train cache as the pipeline does, and with the NumPy
  left-right mirror of half of them (what the step does instead), one thread."""
  rng = np.random.default_rng(0)
  out = {}
  for name, mirror in (("crops", False), ("crops + NumPy mirror", True)):
    start = time.perf_counter()
    for _ in range(batches):
      rows = rng.integers(0, len(cache), batch)
      tops = [rng.integers(0, h - size + 1) for h in cache.shapes[rows, 0]]
      lefts = [rng.integers(0, w - size + 1) for w in cache.shapes[rows, 1]]
      crops = cache.crops(rows, tops, lefts, size)
      if mirror:
        for j in range(0, batch, 2):
          crops[j] = crops[j][:, ::-1]
    out[name] = batches * batch / (time.perf_counter() - start)
  return out


def legacy_batches(split, config, epoch: int):
  """The uncached tf.data path as it was before issue 13: TF stateless random crop offsets
  and flips, float32 normalized on the host."""
  import tensorflow as tf
  from hn_jax.data import samplers, tf_pipeline

  size = config.image_size
  rows = samplers.host_rows(samplers.epoch_indices(split.labels, config, epoch),
                                  config.batch_size, 0, 1)
  positions = (epoch * len(rows) * config.batch_size + np.arange(rows.size)).astype(np.int64)
  elements, decode = tf_pipeline._elements(split.images, rows.reshape(-1))  # pylint: disable=protected-access

  def transform(record, position):
    image = decode(record)
    seed = tf.stack([tf.constant(config.seed, tf.int64), position])
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    resized = tf_pipeline._resized_shape(tf.shape(image), int(1.1 * size))  # pylint: disable=protected-access
    limit = tf.cast(resized, tf.int32) - size + 1
    top_seed, left_seed = tf.unstack(tf.random.experimental.stateless_split(crop_seed, 2))
    offset = tf.cast(tf.stack([
        tf.random.stateless_uniform([], top_seed, 0, limit[0], tf.int32),
        tf.random.stateless_uniform([], left_seed, 0, limit[1], tf.int32)]), tf.float32)
    image = tf.raw_ops.ScaleAndTranslate(
        images=image[None], size=[size, size],
        scale=resized / tf.cast(tf.shape(image)[:2], tf.float32), translation=-offset,
        kernel_type="triangle", antialias=True)[0]
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return {"images": tf_pipeline.normalize(image, config.mean, config.std)}

  ds = tf.data.Dataset.zip((elements, tf.data.Dataset.from_tensor_slices(positions)))
  ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  yield from ds.batch(config.batch_size, drop_remainder=True).prefetch(
      tf.data.AUTOTUNE).as_numpy_iterator()


class _PilDataset:
  """Reads image i from its file and applies the paper's train transforms with PIL."""

  def __init__(self, paths: list[str], labels: np.ndarray, size: int):
    self.paths, self.labels, self.size = paths, labels, size

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int):
    import torch
    from PIL import Image

    rng = np.random.default_rng(index)
    with Image.open(self.paths[index]) as image:
      image = image.convert("RGB")
    size = self.size
    short = int(1.1 * size)
    w, h = image.size
    scale = short / min(w, h)
    image = image.resize((max(short, round(w * scale)), max(short, round(h * scale))),
                         Image.BILINEAR)
    w, h = image.size
    left, top = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
    image = image.crop((left, top, left + size, top + size))
    if rng.random() < 0.5:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return tensor.sub_(mean).div_(std), int(self.labels[index])


def time_torch(paths: list[str], labels: np.ndarray, order: np.ndarray, workers: int,
               batch: int, size: int) -> dict[str, float]:
  import torch

  torch.set_num_threads(1)
  dataset = _PilDataset(paths, labels, size)

  def run(indices):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=list(indices),
                                         num_workers=workers, drop_last=True,
                                         persistent_workers=False)
    count = 0
    for images, _ in loader:
      count += len(images)
    return count

  run(order[:batch * max(workers, 1) * 2])  # warm up the page cache and the imports
  start, cpu = time.perf_counter(), cpu_seconds()
  images = run(order)
  return {"images": images, "wall": time.perf_counter() - start, "cpu": cpu_seconds() - cpu}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=2000, help="JPEGs written (half train)")
  parser.add_argument("--workers", type=int, default=os.cpu_count(),
                      help="DataLoader worker processes (default: one per core)")
  parser.add_argument("--cached_epochs", type=int, default=20,
                      help="epochs timed for each cached row (they are fast)")
  parser.add_argument("--skip_torch", action="store_true", help="leave the PyTorch row out")
  parser.add_argument("--batch", type=int, default=128, help="global batch size")
  parser.add_argument("--image_size", type=int, default=256)
  parser.add_argument("--smoke", action="store_true",
                      help="tiny sizes (64 images, batch 8, 32 px, 1 cached epoch, 1 worker): "
                           "tests the script in seconds, measures nothing")
  parser.add_argument("--json", help="also write the results to this file")
  args = parser.parse_args(argv)
  if args.smoke:
    args.images, args.batch, args.image_size = 64, 8, 32
    args.cached_epochs, args.workers = 1, 1
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from configs import cub
  from hn_jax.data import datasets, input_pipeline, samplers
  from hn_jax.tools import prepare

  cores = os.cpu_count()
  used = {}  # pipeline -> cores it uses
  with tempfile.TemporaryDirectory() as tmp:
    root = write_cub_like(tmp, args.images)
    prepare.prepare("cub", root, os.path.join(tmp, "prepared"), progress=False)
    config = cub.get_config()
    config.batch_size, config.image_size = args.batch, args.image_size
    config.data_dir = os.path.join(tmp, "prepared")
    config.cache = "off"
    dataset = datasets.load(config)
    results = {UNCACHED: time_hn_jax(config, dataset),
               LEGACY: time_hn_jax(config, dataset, batches=legacy_batches)}
    # The same images, in the same order, for PyTorch.
    with open(os.path.join(root, "images.txt")) as f:
      all_paths = {int(i): os.path.join(root, "images", p.strip())
                   for i, p in (line.split(" ", 1) for line in f)}
    from hn_jax.data.tfds_builders import HnCub
    ids = HnCub(data_dir=config.data_dir).info.metadata["splits"]["train"]["image_ids"]
    paths = [all_paths[int(i)] for i in ids]
    order = samplers.epoch_indices(dataset.train.labels, config, 2)
    order = order[:len(order) // args.batch * args.batch]
    if not args.skip_torch:
      results[TORCH] = time_torch(paths, dataset.train.labels, order, args.workers, args.batch,
                                  args.image_size)
    default = input_pipeline.CACHE_THREADS
    other = 2 if default == 1 else 1
    for mode, threads in (("memory", default), ("disk", default), ("memory", other)):
      name = f"hn_jax cache={mode}, {threads} thread{'s' if threads > 1 else ''}"
      config.cache = mode
      config.cache_dir = os.path.join(tmp, f"cache_{mode}")
      cached = datasets.load(config)
      input_pipeline.CACHE_THREADS = threads
      results[name] = time_hn_jax(config, cached, epochs=args.cached_epochs)
      used[name] = min(threads, cores)
    input_pipeline.CACHE_THREADS = default
    flip = time_host_flip(input_pipeline.cache_of(cached.train, "train", config),
                          args.batch, args.image_size)

  load = os.getloadavg()
  print(f"\n{platform.processor() or platform.machine()}, {cores} cores, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
        f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, {args.images // 2} training JPEGs of "
        f"500 x 375, batch {args.batch}, {args.image_size} x {args.image_size}"
        + (" (--smoke: tests the script, measures nothing)" if args.smoke else "") + "\n")
  print("| pipeline | images | images/s (wall) | per core (wall) | images per CPU-second | "
        "first epoch s |")
  print("|---|---|---|---|---|---|")
  for name, r in results.items():
    r["per_second"] = r["images"] / r["wall"]
    r["cores"] = used.get(name, cores)
    r["per_core"] = r["per_second"] / r["cores"]
    r["per_cpu_second"] = r["images"] / r["cpu"]
    first = f"{r['first_epoch_s']:.1f}" if "first_epoch_s" in r else "-"
    print(f"| {name} | {r['images']} | {r['per_second']:.0f} | {r['per_core']:.0f} | "
          f"{r['per_cpu_second']:.0f} | {first} |")
  cached_name = next(n for n in results if n.startswith("hn_jax cache=memory"))
  ratios = {"uncached / before, per core": results[UNCACHED]["per_core"]
                                           / results[LEGACY]["per_core"]}
  if TORCH in results:
    ratios["cached (memory) / PyTorch, per core"] = (results[cached_name]["per_core"]
                                                     / results[TORCH]["per_core"])
    ratios["uncached / PyTorch, per core"] = (results[UNCACHED]["per_core"]
                                              / results[TORCH]["per_core"])
  print()
  for name, value in ratios.items():
    print(f"{name}: {value:.2f}x")
  print(f"{cached_name}, per core (wall): {results[cached_name]['per_core']:.0f} images/s "
        "(target 1500)")
  print(f"one thread cutting {args.image_size} crops from the train cache: "
        + ", ".join(f"{k} {v:.0f}/s" for k, v in flip.items()))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"results": results, "ratios": ratios, "cores": cores, "load": load,
                 "host_flip": flip, "smoke": args.smoke, "batch": args.batch,
                 "image_size": args.image_size}, f, indent=2)


if __name__ == "__main__":
  main()
