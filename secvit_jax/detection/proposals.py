"""Region proposals from the RPN's outputs, as mmdet 2.x's `RPNHead` makes them, with static
shapes."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from secvit_jax.detection import boxes as box_ops
from secvit_jax.detection import nms


def generate_proposals(scores: Sequence[jax.Array], deltas: Sequence[jax.Array],
                       anchors: Sequence[jax.Array], image_size: jax.Array, *, pre_nms_top_k: int,
                       nms_threshold: float = 0.7,
                       post_nms_top_k: int = 1000) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Each image's proposals: per level the top `pre_nms_top_k` anchors by objectness, their
  decoded boxes (means 0, stds 1, |dw|, |dh| <= log(1000 / 16)) clipped to the image, greedy NMS
  at `nms_threshold` within each level (boxes of different levels never suppress each other),
  then the best `post_nms_top_k` survivors of all levels. No minimum box size (mmdet's
  min_bbox_size 0), every anchor of the canvas takes part (mmdet keeps all for proposals). One
  class-aware NMS over all levels with the level as the class gives exactly mmdet's per-level
  `batched_nms` followed by its overall top `max_per_img`.

  Args:
    scores: per level, float (B, N_l), objectness logits in the order of the level's anchors.
    deltas: per level, float (B, N_l, 4), the box deltas (dx, dy, dw, dh).
    anchors: per level, float (N_l, 4) (x0, y0, x1, y1) in input pixels.
    image_size: int (B, 2), (height, width) of each image on the canvas (boxes are clipped to
      it).
    pre_nms_top_k: candidates per level (mmdet's nms_pre: 2,000 training, 1,000 testing).
    nms_threshold: IoU above which a lower-scoring box of the same level is dropped.
    post_nms_top_k: P, the proposals kept per image.

  Returns:
    (boxes float32 (B, P, 4), scores float32 (B, P) (sigmoid probabilities, best first), valid
    bool (B, P): False for slots left over when fewer boxes survive; their box and score are 0).
    No gradient flows through them.
  """
  if not len(scores) == len(deltas) == len(anchors):
    raise ValueError(f'scores, deltas and anchors must have one entry per level, got '
                     f'{len(scores)}, {len(deltas)} and {len(anchors)}')
  if pre_nms_top_k < 1 or post_nms_top_k < 1:
    raise ValueError(f'pre_nms_top_k and post_nms_top_k must be positive, got {pre_nms_top_k} '
                     f'and {post_nms_top_k}')
  candidate_boxes, candidate_scores, candidate_levels = [], [], []
  for level, (level_scores, level_deltas, level_anchors) in enumerate(
      zip(scores, deltas, anchors)):
    if level_scores.shape[-1] != level_anchors.shape[0] or level_deltas.shape[1:] != (
        level_anchors.shape[0], 4):
      raise ValueError(f'level {level}: scores {level_scores.shape} and deltas '
                       f'{level_deltas.shape} do not match its {level_anchors.shape[0]} anchors')
    top_scores, top = jax.lax.top_k(level_scores.astype(jnp.float32),
                                    min(pre_nms_top_k, level_anchors.shape[0]))  # (B, k)
    top_deltas = jnp.take_along_axis(level_deltas.astype(jnp.float32), top[..., None], axis=1)
    decoded = box_ops.decode(jnp.asarray(level_anchors, jnp.float32)[top], top_deltas)
    candidate_boxes.append(decoded)
    candidate_scores.append(jax.nn.sigmoid(top_scores))
    candidate_levels.append(jnp.full(top.shape[1:], level, jnp.int32))
  size = image_size.astype(jnp.float32)[:, None, :]  # (B, 1, 2)
  candidates = box_ops.clip(jnp.concatenate(candidate_boxes, axis=1), size[..., 0], size[..., 1])
  candidate_scores = jnp.concatenate(candidate_scores, axis=1)
  levels = jnp.broadcast_to(jnp.concatenate(candidate_levels), candidate_scores.shape)
  found = nms.survivors(candidates, candidate_scores, levels, jnp.ones_like(levels, bool),
                        iou_threshold=nms_threshold, max_outputs=post_nms_top_k)
  boxes = jnp.where(found['kept'][..., None], found['boxes'], 0.0)
  return jax.lax.stop_gradient((boxes, found['scores'], found['kept']))
