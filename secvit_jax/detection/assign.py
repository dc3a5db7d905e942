"""Ground truth to anchors by IoU, as mmdet 2.x's `MaxIoUAssigner`, on padded ground truth.

For one image: each valid anchor takes the ground-truth box it overlaps most; it is positive when
that IoU is >= `positive_iou`, negative when it is < `negative_iou`, ignored in between. Then each
box also takes the anchors it overlaps most (its best IoU, every anchor that ties; a later box
wins an anchor two boxes both claim), positive whatever the IoU: no box goes without an anchor.
Crowd boxes (COCO's `iscrowd`) never make positives: anchors lying inside one (IoF >=
`crowd_iof`) are ignored, neither positive nor negative.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from secvit_jax.detection import boxes as box_ops


@flax.struct.dataclass
class Assignment:
  """Per anchor: `matched` int32, the index of its ground-truth box (meaningful where positive);
  `positive`, `negative` bool (neither: ignored). Shapes (..., N)."""
  matched: jax.Array
  positive: jax.Array
  negative: jax.Array


def max_iou_assign(anchors: jax.Array, valid: jax.Array, gt_boxes: jax.Array, gt_mask: jax.Array,
                   crowd: jax.Array, *, positive_iou: float = 0.5, negative_iou: float = 0.4,
                   min_best_iou: float = 0.0, crowd_iof: float = 0.5) -> Assignment:
  """Assigns one image's ground truth to its anchors.

  Args:
    anchors: float32 (N, 4).
    valid: bool (N,), anchors on the image (others are neither positive nor negative).
    gt_boxes: float32 (G, 4), padded.
    gt_mask: bool (G,), the real boxes among `gt_boxes`.
    crowd: bool (G,), crowd regions among the real boxes.
    positive_iou, negative_iou: the IoU thresholds.
    min_best_iou: a box takes its best anchors only when their IoU is >= this and > 0 (mmdet's
      `min_pos_iou`; mmdet would also hand a box that overlaps no anchor at all every anchor of
      IoU 0, which this does not).
    crowd_iof: anchors whose intersection with a crowd box covers at least this fraction of
      their area are ignored; <= 0 drops crowd boxes altogether (mmdet's `ignore_iof_thr` -1).

  Returns:
    The `Assignment`, shapes (N,).
  """
  real = gt_mask & ~crowd
  usable = valid
  if crowd_iof > 0:
    inside_crowd = box_ops.pairwise_iof(anchors, gt_boxes) >= crowd_iof  # (N, G)
    usable = usable & ~jnp.any(inside_crowd & (gt_mask & crowd)[None, :], axis=1)
  # Rows of padding and crowd boxes are 0 (they make no positive); unusable anchors -1 (they are
  # neither negative nor any box's best).
  iou = jnp.where(real[:, None], box_ops.pairwise_iou(gt_boxes, anchors), 0.0)  # (G, N)
  iou = jnp.where(usable[None, :], iou, -1.0)
  best_iou, best_gt = jnp.max(iou, axis=0), jnp.argmax(iou, axis=0)
  negative = usable & (best_iou < negative_iou)
  positive = usable & (best_iou >= positive_iou)

  gt_best = jnp.max(iou, axis=1)  # (G,)
  takes_best = real & (gt_best >= min_best_iou) & (gt_best > 0)
  is_best = (iou == gt_best[:, None]) & takes_best[:, None]  # (G, N)
  last_claim = iou.shape[0] - 1 - jnp.argmax(is_best[::-1], axis=0)
  claimed = jnp.any(is_best, axis=0)
  matched = jnp.where(claimed, last_claim, best_gt).astype(jnp.int32)
  positive = positive | claimed
  return Assignment(matched=matched, positive=positive, negative=negative & ~positive)
