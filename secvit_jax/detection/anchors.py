"""Anchors on a feature pyramid, with mmdet 2.x's geometry (`AnchorGenerator`, center_offset 0).

Level l (stride s_l) has, at each location (row r, column c) of its H_l × W_l map, one anchor
per (ratio, scale) pair, ratio-major: scale k is octave_base_scale · 2^(k / scales_per_octave),
the anchor's width s_l · scale / sqrt(ratio) and height s_l · scale · sqrt(ratio)
(ratio = h / w), centred on the pixel (c · s_l, r · s_l). Anchors of a level are ordered
(r, c, anchor) row-major, which is the order of an NHWC head output of A·K channels reshaped to
(H·W·A, K); the levels are concatenated from the finest.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

FeatureSizes = Sequence[tuple[int, int]]  # (H_l, W_l) of every level, finest first.


@dataclasses.dataclass(frozen=True)
class AnchorGenerator:
  """The anchors of a pyramid with levels of `strides` (RetinaNet: 8-128, 9 per location)."""
  strides: tuple[int, ...] = (8, 16, 32, 64, 128)
  octave_base_scale: float = 4.0
  scales_per_octave: int = 3
  ratios: tuple[float, ...] = (0.5, 1.0, 2.0)

  @property
  def num_per_location(self) -> int:
    return len(self.ratios) * self.scales_per_octave

  def base_anchors(self, level: int) -> np.ndarray:
    """float32 (A, 4): the anchors of location (0, 0) of `level`, centred on the origin."""
    stride = self.strides[level]
    scales = self.octave_base_scale * 2.0**(np.arange(self.scales_per_octave)
                                           / self.scales_per_octave)
    h_ratios = np.sqrt(np.asarray(self.ratios, np.float64))
    widths = (stride / h_ratios[:, None] * scales[None, :]).reshape(-1)
    heights = (stride * h_ratios[:, None] * scales[None, :]).reshape(-1)
    return np.stack([-0.5 * widths, -0.5 * heights, 0.5 * widths, 0.5 * heights],
                    axis=-1).astype(np.float32)

  def level_anchors(self, level: int, height: int, width: int) -> np.ndarray:
    """float32 (H·W·A, 4): every anchor of an H × W map of `level`."""
    stride = self.strides[level]
    xs, ys = np.meshgrid(np.arange(width) * stride, np.arange(height) * stride)
    shifts = np.stack([xs, ys, xs, ys], axis=-1).reshape(-1, 1, 4).astype(np.float32)
    return (shifts + self.base_anchors(level)[None]).reshape(-1, 4)

  @functools.lru_cache(maxsize=16)
  def anchors(self, feature_sizes: tuple[tuple[int, int], ...]) -> np.ndarray:
    """float32 (N, 4): the anchors of every level, concatenated (N = A · Σ H_l W_l)."""
    self._check(feature_sizes)
    return np.concatenate([self.level_anchors(level, h, w)
                           for level, (h, w) in enumerate(feature_sizes)])

  def valid(self, feature_sizes: tuple[tuple[int, int], ...], image_size: jax.Array,
            size_divisor: int = 32) -> jax.Array:
    """Which anchors lie on an image rather than on the canvas' padding, as mmdet's valid flags:
    at level l the locations (r, c) with r < ceil(H' / s_l) and c < ceil(W' / s_l), (H', W') the
    image size rounded up to `size_divisor` (the padded image mmdet batches).

    Args:
      feature_sizes: (H_l, W_l) of every level.
      image_size: int (..., 2), (height, width) of each image on the canvas.
      size_divisor: the padding multiple.

    Returns:
      bool (..., N), in the order of `anchors`.
    """
    self._check(feature_sizes)
    padded = -(-jnp.asarray(image_size) // size_divisor) * size_divisor
    masks = []
    for (height, width), stride in zip(feature_sizes, self.strides):
      rows = jnp.arange(height) < -(-padded[..., 0:1] // stride)  # (..., H)
      cols = jnp.arange(width) < -(-padded[..., 1:2] // stride)  # (..., W)
      grid = rows[..., :, None] & cols[..., None, :]
      masks.append(jnp.repeat(grid.reshape(grid.shape[:-2] + (-1,)), self.num_per_location,
                              axis=-1))
    return jnp.concatenate(masks, axis=-1)

  def _check(self, feature_sizes: FeatureSizes) -> None:
    if len(feature_sizes) != len(self.strides):
      raise ValueError(f'{len(feature_sizes)} feature maps for anchors of {len(self.strides)} '
                       f'strides {self.strides}')


def feature_sizes(height: int, width: int, strides: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """(H_l, W_l) of each stride's map for an H × W input when every stride-2 step rounds up (the
  SecViT stem and downsamples, and the FPN's extra 3×3 stride-2 convs with padding 1)."""
  sizes = []
  for stride in strides:
    steps = int(math.log2(stride))
    h, w = height, width
    for _ in range(steps):
      h, w = -(-h // 2), -(-w // 2)
    sizes.append((h, w))
  return tuple(sizes)
