"""Non-maximum suppression with static shapes, for the device.

Greedy NMS keeps the highest-scoring box, drops the boxes of its class that overlap it by IoU >
the threshold, and repeats. Its first k survivors come from k rounds of "take the best live box,
then suppress": a loop of exactly `max_outputs` rounds over a fixed set of candidates gives the
same boxes, in the same order, as sorting, suppressing everything and keeping the top
`max_outputs` (what mmdet's `batched_nms` then `[:max_per_img]` do), at a cost of max_outputs × K
IoUs instead of K².
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from secvit_jax.detection import boxes as box_ops


def batched_nms(boxes: jax.Array, scores: jax.Array, labels: jax.Array, valid: jax.Array, *,
                iou_threshold: float, max_outputs: int) -> tuple[jax.Array, jax.Array]:
  """Class-aware greedy NMS of one image's candidates (boxes of different labels never suppress
  each other, as mmdet's `batched_nms`).

  Args:
    boxes: float (K, 4) (x0, y0, x1, y1).
    scores: float (K,).
    labels: int (K,).
    valid: bool (K,), the real candidates.
    iou_threshold: a box is suppressed by a kept box of its class when their IoU is above this.
    max_outputs: the survivors returned.

  Returns:
    (indices int32 (max_outputs,) into the candidates, best first; kept bool (max_outputs,),
    False for the slots left over when fewer candidates survive; their index is 0).
  """
  live = jnp.where(valid, scores.astype(jnp.float32), -jnp.inf)

  def round_(i, carry):
    live, indices, kept = carry
    best = jnp.argmax(live).astype(jnp.int32)
    found = live[best] > -jnp.inf
    overlap = box_ops.pairwise_iou(boxes[best][None], boxes)[0]
    suppressed = ((overlap > iou_threshold) & (labels == labels[best])).at[best].set(True)
    live = jnp.where(suppressed & found, -jnp.inf, live)
    return (live, indices.at[i].set(jnp.where(found, best, 0)), kept.at[i].set(found))

  _, indices, kept = jax.lax.fori_loop(
      0, max_outputs, round_,
      (live, jnp.zeros((max_outputs,), jnp.int32), jnp.zeros((max_outputs,), bool)))
  return indices, kept


def survivors(boxes: jax.Array, scores: jax.Array, labels: jax.Array, valid: jax.Array, *,
              iou_threshold: float, max_outputs: int) -> dict[str, jax.Array]:
  """`batched_nms` of each image of a batch, and its survivors gathered.

  Args:
    boxes: float (B, K, 4); scores: float (B, K); labels: int (B, K); valid: bool (B, K).
    iou_threshold, max_outputs: as `batched_nms`'s.

  Returns:
    'boxes' (B, D, 4), 'scores' (B, D), 'labels' (B, D), 'kept' bool (B, D), D = max_outputs,
    best first; a slot not kept has score 0 and candidate 0's box and label.
  """
  indices, kept = jax.vmap(lambda b, s, l, v: batched_nms(
      b, s, l, v, iou_threshold=iou_threshold, max_outputs=max_outputs))(
          boxes, scores, labels, valid)
  take = lambda x: jnp.take_along_axis(x, indices, axis=1)
  return {'boxes': jnp.take_along_axis(boxes, indices[..., None], axis=1),
          'scores': jnp.where(kept, take(scores), 0.0), 'labels': take(labels), 'kept': kept}
