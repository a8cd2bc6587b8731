"""Contact sheets: rows of thumbnails in coloured frames (PIL), for searches and TensorBoard.

`contact_sheet(rows)` draws one row per query: each cell a thumbnail of `thumb` pixels in a
frame of `FRAME` pixels whose colour names what the cell is (`COLORS`): the query (blue), a
neighbour of its label (green), of another label (red), or of an unknown one (grey).
`neighbour_colors` gives the neighbours' colour names from the labels. No JAX, no TensorFlow.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

FRAME = 4
COLORS = {"query": (40, 90, 220), "correct": (30, 170, 60), "wrong": (210, 40, 40),
          "unknown": (150, 150, 150)}


def thumbnail(image: np.ndarray, size: int):
  """A PIL image of `image` (uint8 (H, W, 3)) whose longer side is `size` pixels."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  picture = Image.fromarray(np.asarray(image, np.uint8))
  scale = size / max(picture.size)
  new = (max(1, round(picture.size[0] * scale)), max(1, round(picture.size[1] * scale)))
  if new == picture.size:
    return picture
  method = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
  return picture.resize(new, method)


def neighbour_colors(query_label: int | None, neighbour_labels: Sequence[int]) -> list[str]:
  """The frame colour name of each neighbour: correct, wrong, or unknown (no query label)."""
  if query_label is None:
    return ["unknown"] * len(neighbour_labels)
  return ["correct" if int(label) == int(query_label) else "wrong"
          for label in neighbour_labels]


def contact_sheet(rows: Sequence[Sequence[tuple[np.ndarray, str]]], thumb: int = 96):
  """A PIL image: one row per entry of `rows`, each a list of (uint8 image, frame color name).

  Every cell is thumb + 2 FRAME pixels square; the sheet is (longest row) x len(rows) cells.
  A colour name of "" (or None) draws no frame.
  """
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  cell = thumb + 2 * FRAME
  width = max((len(r) for r in rows), default=1) * cell
  sheet = Image.new("RGB", (width, max(1, len(rows)) * cell), (255, 255, 255))
  draw = ImageDraw.Draw(sheet)
  for y, row in enumerate(rows):
    for x, (image, color) in enumerate(row):
      left, top = x * cell, y * cell
      if color:
        draw.rectangle([left, top, left + cell - 1, top + cell - 1], fill=COLORS[color])
        draw.rectangle([left + FRAME, top + FRAME, left + FRAME + thumb - 1,
                        top + FRAME + thumb - 1], fill=(255, 255, 255))
      picture = thumbnail(image, thumb)
      sheet.paste(picture, (left + FRAME + (thumb - picture.size[0]) // 2,
                            top + FRAME + (thumb - picture.size[1]) // 2))
  return sheet
