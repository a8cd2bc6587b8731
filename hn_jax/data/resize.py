"""The resize rules of both image paths: the NumPy decoded-image cache and tf.data.

One place for them, so that a cached and an uncached batch are cut from images of the same
size, and so that neither path imports the other.
"""

from __future__ import annotations

import numpy as np

RESIZE_RULES = {
    "train": "shorter side to int(1.1 x size), bilinear antialiased (triangle), rounded to uint8",
    "eval": "shorter side to size, bilinear antialiased (triangle), center crop, rounded to uint8",
}


def train_short_side(image_size: int) -> int:
  return int(1.1 * image_size)


def short_side(kind: str, image_size: int) -> int:
  """The shorter side a `kind` ("train" or "eval") image is resized to."""
  return train_short_side(image_size) if kind == "train" else image_size


def resized_shape(height: int, width: int, short: int) -> tuple[int, int]:
  """(H, W) with the shorter side resized to `short`, as the tf.data path computes it."""
  scale = np.float32(short) / np.float32(min(height, width))
  return (max(short, int(np.round(np.float32(height) * scale))),
          max(short, int(np.round(np.float32(width) * scale))))
