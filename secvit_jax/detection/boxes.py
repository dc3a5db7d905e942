"""Box arithmetic as mmdet 2.x does it: areas, pairwise IoU / IoF, clipping, and the delta coding
of boxes relative to anchors (`DeltaXYWHBBoxCoder`).

Layout: a box is (x0, y0, x1, y1) in pixels of the network's input, x1 >= x0 and y1 >= y0; its
width is x1 - x0 (no +1, mmdet 2.x and COCO's convention). Functions take boxes on the last axis
and broadcast over leading ones; they work on NumPy and JAX arrays alike where noted.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# mmdet's bound on a decoded width or height change: exp(|log(16 / 1000)|) = 62.5×.
MAX_LOG_RATIO = abs(math.log(16 / 1000))


def area(boxes: jax.Array) -> jax.Array:
  """(..., 4) -> (...): (x1 - x0) · (y1 - y0)."""
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def intersection(a: jax.Array, b: jax.Array) -> jax.Array:
  """Pairwise intersection areas: a (N, 4), b (M, 4) -> (N, M), 0 where disjoint."""
  top_left = jnp.maximum(a[:, None, :2], b[None, :, :2])
  bottom_right = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
  size = jnp.maximum(bottom_right - top_left, 0.0)
  return size[..., 0] * size[..., 1]


def pairwise_iou(a: jax.Array, b: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Intersection over union of every pair: a (N, 4), b (M, 4) -> (N, M) in [0, 1].

  The union is floored at `eps` as mmdet's `bbox_overlaps` does, so empty boxes give 0.
  """
  inter = intersection(a, b)
  union = area(a)[:, None] + area(b)[None, :] - inter
  return inter / jnp.maximum(union, eps)


def pairwise_iof(a: jax.Array, b: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Intersection over the area of the first box ("foreground"): a (N, 4), b (M, 4) -> (N, M).

  mmdet's `bbox_overlaps(a, b, mode='iof')`: how much of each box of `a` lies in each of `b`.
  """
  return intersection(a, b) / jnp.maximum(area(a)[:, None], eps)


def clip(boxes: jax.Array, height: jax.Array, width: jax.Array) -> jax.Array:
  """Boxes (..., 4) clipped to the image [0, width] × [0, height] (scalars or broadcastable)."""
  x0, y0, x1, y1 = (boxes[..., i] for i in range(4))
  width = jnp.asarray(width, boxes.dtype)
  height = jnp.asarray(height, boxes.dtype)
  return jnp.stack([jnp.clip(x0, 0, width), jnp.clip(y0, 0, height), jnp.clip(x1, 0, width),
                    jnp.clip(y1, 0, height)], axis=-1)


def _centers_and_sizes(boxes: jax.Array) -> tuple[jax.Array, ...]:
  width = boxes[..., 2] - boxes[..., 0]
  height = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + 0.5 * width, boxes[..., 1] + 0.5 * height, width, height


def encode(anchors: jax.Array, boxes: jax.Array, means=(0.0, 0.0, 0.0, 0.0),
           stds=(1.0, 1.0, 1.0, 1.0)) -> jax.Array:
  """The deltas (dx, dy, dw, dh) that take each anchor to its box (mmdet's `bbox2delta`).

  dx = (x_box - x_anchor) / w_anchor, dw = log(w_box / w_anchor) (centres x, sizes w; likewise y,
  h), then (delta - mean) / std. anchors, boxes (..., 4) -> (..., 4). Boxes must have a positive
  size (a degenerate box gives -inf; callers mask the deltas of anchors that match nothing).
  """
  ax, ay, aw, ah = _centers_and_sizes(anchors)
  bx, by, bw, bh = _centers_and_sizes(boxes)
  deltas = jnp.stack([(bx - ax) / aw, (by - ay) / ah, jnp.log(bw / aw), jnp.log(bh / ah)],
                     axis=-1)
  return (deltas - jnp.asarray(means, deltas.dtype)) / jnp.asarray(stds, deltas.dtype)


def decode(anchors: jax.Array, deltas: jax.Array, means=(0.0, 0.0, 0.0, 0.0),
           stds=(1.0, 1.0, 1.0, 1.0), max_log_ratio: float = MAX_LOG_RATIO) -> jax.Array:
  """The boxes that `deltas` make of `anchors` (mmdet's `delta2bbox`): the inverse of `encode`,
  with dw and dh clipped to ±max_log_ratio first. anchors, deltas (..., 4) -> (..., 4); clip the
  result to the image with `clip`."""
  deltas = deltas * jnp.asarray(stds, deltas.dtype) + jnp.asarray(means, deltas.dtype)
  dx, dy = deltas[..., 0], deltas[..., 1]
  dw = jnp.clip(deltas[..., 2], -max_log_ratio, max_log_ratio)
  dh = jnp.clip(deltas[..., 3], -max_log_ratio, max_log_ratio)
  ax, ay, aw, ah = _centers_and_sizes(anchors)
  x, y = ax + aw * dx, ay + ah * dy
  w, h = aw * jnp.exp(dw), ah * jnp.exp(dh)
  return jnp.stack([x - 0.5 * w, y - 0.5 * h, x + 0.5 * w, y + 0.5 * h], axis=-1)
