"""Scenes of handwritten digits, the offline data of the dense-prediction demos and tests.

scikit-learn's 8×8 digits (the 'train' or 'test' split of `sources.digits_splits`, so held-out
scenes show held-out digits) are scaled up and pasted at random places of a canvas, without
overlapping, each in a colour of its own over a smooth background of random colours. Every ink
pixel is labelled with its digit and every digit has the tight box of its ink. A scene is a
function of (seed, split, index) alone.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from secvit_jax.data import sources

# A pasted digit's pixel is ink (labelled) where the scaled-up digit is at least this bright.
INK_LEVEL = 96


@dataclasses.dataclass(frozen=True)
class Scene:
  """image: uint8 (H, W, 3); labels: uint8 (H, W), 0 for the background and 1 + d on the ink of
  digit d; boxes: float32 (N, 4), each digit's ink as (x0, y0, x1, y1) in pixels, x1 and y1 one
  past the last ink column and row; classes: int32 (N,), the digits."""
  image: np.ndarray
  labels: np.ndarray
  boxes: np.ndarray
  classes: np.ndarray


def render_scene(seed: int, split: str, index: int, *, height: int, width: int,
                 digits: tuple[int, int] = (1, 4), sizes: tuple[int, int] = (16, 40)) -> Scene:
  """Scene `index` of `split` for `seed`.

  Args:
    seed: the dataset's seed.
    split: 'train' or 'test', the digits to draw from.
    index: the scene's number.
    height, width: the canvas.
    digits: (min, max) digits per scene, inclusive; fewer when they do not fit.
    sizes: (min, max) side in pixels of a pasted digit's 8×8 square, inclusive.
  """
  rng = np.random.default_rng([seed, ('train', 'test').index(split), index])
  images, labels = sources.digits_splits()[split]
  canvas = _background(rng, height, width)
  label_map = np.zeros((height, width), np.uint8)
  boxes, classes, taken = [], [], []
  for _ in range(rng.integers(digits[0], digits[1] + 1)):
    size = int(rng.integers(sizes[0], min(sizes[1], height, width) + 1))
    for _ in range(20):  # Places tried before giving up on this digit.
      top = int(rng.integers(0, height - size + 1))
      left = int(rng.integers(0, width - size + 1))
      if all(top >= b or top + size <= t or left >= r or left + size <= l
             for t, l, b, r in taken):
        break
    else:
      continue
    taken.append((top, left, top + size, left + size))
    which = int(rng.integers(len(labels)))
    alpha = np.asarray(Image.fromarray(images[which]).resize((size, size), Image.BILINEAR))
    ink = alpha >= INK_LEVEL
    if not ink.any():
      continue
    colour = rng.integers(150, 256, 3)
    window = canvas[top:top + size, left:left + size]
    weight = (alpha / 255.0)[..., None]
    canvas[top:top + size, left:left + size] = window * (1 - weight) + colour * weight
    label_map[top:top + size, left:left + size][ink] = 1 + labels[which]
    rows, cols = np.nonzero(ink)
    boxes.append((left + cols.min(), top + rows.min(), left + cols.max() + 1,
                  top + rows.max() + 1))
    classes.append(labels[which])
  return Scene(image=np.round(canvas).clip(0, 255).astype(np.uint8), labels=label_map,
               boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
               classes=np.asarray(classes, np.int32))


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """float64 (H, W, 3): a dim colour gradient with a little noise."""
  corners = rng.uniform(0, 110, (2, 2, 3))
  y = np.linspace(0, 1, height)[:, None, None]
  x = np.linspace(0, 1, width)[None, :, None]
  top = corners[0, 0] * (1 - x) + corners[0, 1] * x
  bottom = corners[1, 0] * (1 - x) + corners[1, 1] * x
  return top * (1 - y) + bottom * y + rng.normal(0, 6, (height, width, 3))
