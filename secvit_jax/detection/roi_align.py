"""RoIAlign (mmcv's, aligned=True) on one feature map or on the levels of a feature pyramid, with
static shapes, for the device.

A box (x0, y0, x1, y1) in input pixels maps onto a map of stride s as x0 / s - 0.5 ... x1 / s - 0.5
(aligned=True: cell k's centre is at k), is split into output_size × output_size bins, and each
bin averages sampling_ratio × sampling_ratio bilinear samples on a regular grid inside it (sample
(a, b) of bin (i, j) at y0' + (i + (a + 0.5) / ratio) · bin_height, likewise x). A sample outside
[-1, H] × [-1, W] is 0; otherwise its coordinates are clamped to [0, H - 1] × [0, W - 1] and it
interpolates the four cells around it. mmcv's sampling_ratio=0 (mmdet's Mask R-CNN) takes an
adaptive ceil(box side / output_size) samples per bin along each axis; here the ratio is fixed
(default 2), the same as mmcv's for box sides of (output_size, 2 · output_size] cells; mmcv reads
smaller boxes with 1 sample per bin and larger ones with more.

Every sample reads its 4 cells by a gather (work and memory ∝ K · (out · ratio)² · 4 · C, whatever
the map's size); on a pyramid the levels are flattened and concatenated (no padding) and each box
reads only its own level. A separable form (per box, bilinear interpolation matrices over rows
A_y (out, H) and columns A_x (out, W), bins = A_y · F · A_xᵀ as two matrix products, ∝ K · out ·
H · W · C per level, every box on every level) was measured against it on the CPU (2 shared
cores, B = 2, C = 256, 4 levels, forward + backward): 512 boxes at 7 × 7 on a 256² canvas
(P2 64²) 0.8-1.3 s gathering vs 3.4-8.6 s separable; 128 boxes at 14 × 14 0.7-1.3 s vs 1.2-3.3 s;
on a 128² canvas 1.3 vs 1.4 s (7 × 7) and 0.75 vs 0.6 s (14 × 14). Its cost grows with the
map's area (on a 1344² canvas 512 + 128 boxes would take ~400 GFLOPs per image, more than the
whole RMT-S Mask R-CNN's 262), so only the gather is kept.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def roi_levels(boxes: jax.Array, num_levels: int = 4, finest_scale: float = 56.0) -> jax.Array:
  """mmdet's `map_roi_levels`: the pyramid level of each box, floor(log2(sqrt(w · h) /
  finest_scale + 1e-6)) clamped to [0, num_levels - 1]. boxes (..., 4) -> int32 (...)."""
  scale = jnp.sqrt(jnp.maximum((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]),
                               0.0))
  level = jnp.floor(jnp.log2(scale / finest_scale + 1e-6))
  return jnp.clip(level, 0, num_levels - 1).astype(jnp.int32)


def _sample_coordinates(starts: jax.Array, ends: jax.Array, output_size: int,
                        sampling_ratio: int) -> jax.Array:
  """Sample positions along one axis: box ends (B, K) in cells -> (B, K, out · ratio), bin-major
  (position i · ratio + a is sample a of bin i)."""
  offsets = (jnp.arange(output_size * sampling_ratio, dtype=jnp.float32) + 0.5) / sampling_ratio
  return starts[..., None] + offsets * ((ends - starts) / output_size)[..., None]


def _axis_taps(coords: jax.Array, length: jax.Array):
  """mmcv's bilinear taps along one axis: sample positions (B, K, S) on an axis of `length`
  (B, K) cells -> (low int32, high int32, weight of high, valid bool), each (B, K, S)."""
  length = length[..., None].astype(jnp.float32)
  valid = (coords >= -1.0) & (coords <= length)
  coords = jnp.clip(coords, 0.0, length - 1)
  low = jnp.floor(coords)
  return (low.astype(jnp.int32), jnp.minimum(low + 1, length - 1).astype(jnp.int32),
          coords - low, valid)


def _gather(flat_features: jax.Array, offsets: jax.Array, heights: jax.Array, widths: jax.Array,
            ys: jax.Array, xs: jax.Array, output_size: int, sampling_ratio: int) -> jax.Array:
  """Bilinear samples read cell by cell from maps flattened into `flat_features` (B, N, C): box k
  reads the H × W map (heights, widths (B, K)) starting at row `offsets` (B, K); ys, xs (B, K, S)
  its sample rows and columns. -> (B, K, out, out, C), the bins' averages."""
  y_low, y_high, fy, y_valid = _axis_taps(ys, heights)
  x_low, x_high, fx, x_valid = _axis_taps(xs, widths)
  dtype = flat_features.dtype
  fy = (fy * y_valid)[..., :, None]  # (B, K, S, 1)
  fx = (fx * x_valid)[..., None, :]  # (B, K, 1, S)
  gy = (1 - fy) * y_valid[..., :, None]
  gx = (1 - fx) * x_valid[..., None, :]
  base = offsets[..., None, None]
  row_width = widths[..., None, None]
  read = jax.vmap(lambda features, index: features[index])

  def corner(rows, cols, weight):
    index = base + rows[..., :, None] * row_width + cols[..., None, :]  # (B, K, S, S)
    return read(flat_features, index) * weight.astype(dtype)[..., None]

  values = (corner(y_low, x_low, gy * gx) + corner(y_low, x_high, gy * fx)
            + corner(y_high, x_low, fy * gx) + corner(y_high, x_high, fy * fx))
  batch, boxes, channels = values.shape[0], values.shape[1], values.shape[-1]
  values = values.reshape(batch, boxes, output_size, sampling_ratio, output_size, sampling_ratio,
                          channels)
  return values.mean(axis=(3, 5), dtype=jnp.float32).astype(dtype)


def _check(features: Sequence[jax.Array], boxes: jax.Array, output_size: int,
           sampling_ratio: int):
  if boxes.ndim != 3 or boxes.shape[-1] != 4:
    raise ValueError(f'boxes must be (B, K, 4), got shape {boxes.shape}')
  for level, feature_map in enumerate(features):
    if feature_map.ndim != 4 or feature_map.shape[0] != boxes.shape[0]:
      raise ValueError(f'features[{level}] must be (B, H, W, C) with B = {boxes.shape[0]} as in '
                       f'boxes, got shape {feature_map.shape}')
  if output_size < 1 or sampling_ratio < 1:
    raise ValueError(f'output_size and sampling_ratio must be positive, got {output_size} and '
                     f'{sampling_ratio}')


def _align(features: Sequence[jax.Array], boxes: jax.Array, scale: jax.Array, levels: jax.Array,
           output_size: int, sampling_ratio: int) -> jax.Array:
  """Box k of image b on the map features[levels[b, k]] with cells per pixel scale[b, k]: boxes
  (B, K, 4), scale (B, K), levels int32 (B, K) -> (B, K, out, out, C)."""
  boxes = jax.lax.stop_gradient(boxes) * scale[..., None] - 0.5
  ys = _sample_coordinates(boxes[..., 1], boxes[..., 3], output_size, sampling_ratio)
  xs = _sample_coordinates(boxes[..., 0], boxes[..., 2], output_size, sampling_ratio)
  sizes = [feature_map.shape[1:3] for feature_map in features]
  flat = jnp.concatenate([feature_map.reshape(feature_map.shape[0], -1, feature_map.shape[-1])
                          for feature_map in features], axis=1)
  starts = [sum(h * w for h, w in sizes[:level]) for level in range(len(sizes))]
  per_level = lambda values: jnp.asarray(values, jnp.int32)[levels]
  return _gather(flat, per_level(starts), per_level([h for h, _ in sizes]),
                 per_level([w for _, w in sizes]), ys, xs, output_size, sampling_ratio)


def multilevel_roi_align(features: Sequence[jax.Array], boxes: jax.Array, *, output_size: int,
                         strides: Sequence[int] = (4, 8, 16, 32), sampling_ratio: int = 2,
                         finest_scale: float = 56.0) -> jax.Array:
  """RoIAlign of each box on its own pyramid level (`roi_levels`), as mmdet's
  `SingleRoIExtractor`.

  Args:
    features: the levels' maps (B, H_l, W_l, C), finest first, of `strides`.
    boxes: float (B, K, 4) (x0, y0, x1, y1) in input pixels; they get no gradient.
    output_size: the bins per side.
    strides: the levels' strides.
    sampling_ratio: samples per bin along each axis.
    finest_scale: the box scale that starts level 1 (mmdet: 56).

  Returns:
    (B, K, output_size, output_size, C) in the features' dtype; differentiable w.r.t. features.
  """
  if len(features) != len(strides):
    raise ValueError(f'features has {len(features)} levels but strides {tuple(strides)} has '
                     f'{len(strides)}')
  _check(features, boxes, output_size, sampling_ratio)
  boxes = boxes.astype(jnp.float32)
  levels = jax.lax.stop_gradient(roi_levels(boxes, len(features), finest_scale))
  scale = 1.0 / jnp.asarray(strides, jnp.float32)[levels]
  return _align(features, boxes, scale, levels, output_size, sampling_ratio)


def roi_align(features: jax.Array, boxes: jax.Array, *, output_size: int, spatial_scale: float,
              sampling_ratio: int = 2) -> jax.Array:
  """RoIAlign (aligned=True) of boxes on one map.

  Args:
    features: (B, H, W, C).
    boxes: float (B, K, 4) (x0, y0, x1, y1) in input pixels; they get no gradient.
    output_size: the bins per side.
    spatial_scale: the map's cells per input pixel (1 / stride).
    sampling_ratio: samples per bin along each axis.

  Returns:
    (B, K, output_size, output_size, C) in the features' dtype; differentiable w.r.t. features.
  """
  _check([features], boxes, output_size, sampling_ratio)
  levels = jnp.zeros(boxes.shape[:2], jnp.int32)
  return _align([features], boxes.astype(jnp.float32), levels + spatial_scale, levels,
                output_size, sampling_ratio)
