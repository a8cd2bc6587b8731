"""Train-pipeline throughput: hn_jax's tf.data pipeline against a PyTorch DataLoader with PIL.

  python benchmarks/input_pipeline.py [--images=2000] [--workers=N]

Writes CUB-like JPEGs (500 x 375 or 375 x 500, quality 90, cut from scikit-learn's two sample
photos at random scales and offsets) in the CUB layout, prepares them with `hn_jax.prepare`,
then times one training epoch of each pipeline on the same index stream (the `filled`
sampler), batch 128, image size 256, the paper's transforms:

- hn_jax: `input_pipeline.train_batches` reading the ArrayRecord files (and, separately, with
  `cache_images`);
- PyTorch: a `DataLoader` with `workers` processes, each image read from its file and
  transformed with PIL by hand as torchvision would (torchvision is not installed): resize the
  shorter side to 281 (bilinear), random 256 crop, random flip, to tensor, normalize.

Reports images/s (wall) and images per CPU-second, the CPU time of every thread and worker
process (what "per core" means here: a pipeline that keeps N cores busy gets N times that).
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

BATCH = 128
SIZE = 256
MEAN = (0.4707, 0.4601, 0.4549)
STD = (0.2767, 0.2760, 0.2850)


def write_cub_like(root: str, num_images: int, seed: int = 0) -> str:
  """A CUB layout of `num_images` CUB-sized JPEGs in 100 train and 100 test classes."""
  from PIL import Image
  from sklearn.datasets import load_sample_image

  rng = np.random.default_rng(seed)
  photos = [Image.fromarray(load_sample_image(n)) for n in ("china.jpg", "flower.jpg")]
  cub = os.path.join(root, "CUB_200_2011")
  lines, labels = [], []
  for i in range(num_images):
    class_id = 1 + i % 200
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


def time_hn_jax(config, dataset) -> dict[str, float]:
  from hn_jax import input_pipeline

  # Warm up (and, with cache_images, fill the cache) on epoch 1; time epoch 2.
  for _ in input_pipeline.train_batches(dataset.train, config, epoch=1):
    pass
  start, cpu = time.perf_counter(), cpu_seconds()
  images = 0
  for batch in input_pipeline.train_batches(dataset.train, config, epoch=2):
    images += len(batch["images"])
  return {"images": images, "wall": time.perf_counter() - start, "cpu": cpu_seconds() - cpu}


class _PilDataset:
  """Reads image i from its file and applies the paper's train transforms with PIL."""

  def __init__(self, paths: list[str], labels: np.ndarray):
    self.paths, self.labels = paths, labels

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int):
    import torch
    from PIL import Image

    rng = np.random.default_rng(index)
    with Image.open(self.paths[index]) as image:
      image = image.convert("RGB")
    short = int(1.1 * SIZE)
    w, h = image.size
    scale = short / min(w, h)
    image = image.resize((max(short, round(w * scale)), max(short, round(h * scale))),
                         Image.BILINEAR)
    w, h = image.size
    left, top = int(rng.integers(0, w - SIZE + 1)), int(rng.integers(0, h - SIZE + 1))
    image = image.crop((left, top, left + SIZE, top + SIZE))
    if rng.random() < 0.5:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
    tensor = torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return tensor.sub_(mean).div_(std), int(self.labels[index])


def time_torch(paths: list[str], labels: np.ndarray, order: np.ndarray,
               workers: int) -> dict[str, float]:
  import torch

  torch.set_num_threads(1)
  dataset = _PilDataset(paths, labels)

  def run(indices):
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, sampler=list(indices),
                                         num_workers=workers, drop_last=True,
                                         persistent_workers=False)
    count = 0
    for images, _ in loader:
      count += len(images)
    return count

  run(order[:BATCH * workers * 2])  # warm up the page cache and the imports
  start, cpu = time.perf_counter(), cpu_seconds()
  images = run(order)
  return {"images": images, "wall": time.perf_counter() - start, "cpu": cpu_seconds() - cpu}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=2000, help="JPEGs written (half train)")
  parser.add_argument("--workers", type=int, default=os.cpu_count(),
                      help="DataLoader worker processes (default: one per core)")
  parser.add_argument("--json", help="also write the results to this file")
  args = parser.parse_args()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from configs import cub
  from hn_jax import datasets, input_pipeline, prepare

  with tempfile.TemporaryDirectory() as tmp:
    root = write_cub_like(tmp, args.images)
    prepare.prepare("cub", root, os.path.join(tmp, "prepared"), progress=False)
    config = cub.get_config()
    config.data_dir = os.path.join(tmp, "prepared")
    dataset = datasets.load(config)
    results = {"hn_jax tf.data (ArrayRecord)": time_hn_jax(config, dataset)}
    # The same images, in the same order, for PyTorch.
    with open(os.path.join(root, "images.txt")) as f:
      all_paths = {int(i): os.path.join(root, "images", p.strip())
                   for i, p in (line.split(" ", 1) for line in f)}
    from hn_jax.tfds_builders import HnCub
    ids = HnCub(data_dir=config.data_dir).info.metadata["splits"]["train"]["image_ids"]
    paths = [all_paths[int(i)] for i in ids]
    order = input_pipeline.epoch_indices(dataset.train.labels, config, 2)
    order = order[:len(order) // BATCH * BATCH]
    results[f"PyTorch DataLoader + PIL ({args.workers} workers)"] = time_torch(
        paths, dataset.train.labels, order, args.workers)
    config.cache_images = True
    cached = datasets.load(config)
    results["hn_jax tf.data, cache_images=True"] = time_hn_jax(config, cached)

  cores = os.cpu_count()
  print(f"\n{platform.processor() or platform.machine()}, {cores} cores, "
        f"{time.strftime('%Y-%m-%d')}, {args.images // 2} training JPEGs of 500 x 375, "
        f"batch {BATCH}, {SIZE} x {SIZE}\n")
  print("| pipeline | images | images/s (wall) | images per CPU-second |")
  print("|---|---|---|---|")
  for name, r in results.items():
    r["per_second"] = r["images"] / r["wall"]
    r["per_cpu_second"] = r["images"] / r["cpu"]
    print(f"| {name} | {r['images']} | {r['per_second']:.0f} | {r['per_cpu_second']:.0f} |")
  torch_name = next(n for n in results if n.startswith("PyTorch"))
  ratio = (results["hn_jax tf.data (ArrayRecord)"]["per_cpu_second"]
           / results[torch_name]["per_cpu_second"])
  print(f"\nhn_jax / PyTorch, images per CPU-second: {ratio:.2f}x")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"results": results, "ratio": ratio, "cores": cores}, f, indent=2)


if __name__ == "__main__":
  main()
