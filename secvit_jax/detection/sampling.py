"""Balanced random sampling of training examples, as mmdet 2.x's `RandomSampler`, with static
shapes: random keys and top_k pick a fixed number of slots, slots left unfilled weigh 0.

mmdet draws up to num · positive_fraction positives at random among the positives, then fills
the rest of the num samples with random negatives; fewer when there are not enough."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from secvit_jax.detection import assign as assign_lib


def _random_pick(eligible: jax.Array, key: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
  """Up to `count` of the eligible entries of each row, uniformly at random and in random order:
  eligible bool (B, N) -> (indices int32 (B, count), picked bool (B, count): False for slots left
  over when a row has fewer eligible entries)."""
  priority = jnp.where(eligible, jax.random.uniform(key, eligible.shape), -1.0)
  priority, indices = jax.lax.top_k(priority, count)
  return indices.astype(jnp.int32), priority >= 0


def _as_mask(indices: jax.Array, picked: jax.Array, length: int) -> jax.Array:
  """Indices (B, K) with their picked flags -> bool (B, length), True at the picked indices."""
  rows = jnp.arange(indices.shape[0])[:, None]
  return jnp.zeros((indices.shape[0], length), bool).at[rows, indices].max(picked)


def sample_anchors(labels: jax.Array, key: jax.Array, *, num_samples: int = 256,
                   positive_fraction: float = 0.5) -> tuple[jax.Array, jax.Array]:
  """The RPN's anchor sample: at most int(num_samples · positive_fraction) positives, then
  negatives up to num_samples in all.

  Args:
    labels: int32 (B, N), 1 positive, 0 negative, -1 ignored (or invalid).
    key: a PRNG key.
    num_samples: anchors per image.
    positive_fraction: the largest share of positives.

  Returns:
    (positive bool (B, N), negative bool (B, N)), the sampled anchors of each kind.
  """
  if labels.ndim != 2:
    raise ValueError(f'labels must be (B, N), got shape {labels.shape}')
  num_anchors = labels.shape[1]
  positive_key, negative_key = jax.random.split(key)
  positives, positive_picked = _random_pick(
      labels == 1, positive_key, min(int(num_samples * positive_fraction), num_anchors))
  negatives, negative_picked = _random_pick(labels == 0, negative_key,
                                            min(num_samples, num_anchors))
  room = num_samples - jnp.sum(positive_picked, axis=1, keepdims=True)
  negative_picked = negative_picked & (jnp.arange(negatives.shape[1]) < room)
  return (_as_mask(positives, positive_picked, num_anchors),
          _as_mask(negatives, negative_picked, num_anchors))


def sample_rois(proposals: jax.Array, proposal_valid: jax.Array, gt_boxes: jax.Array,
                gt_labels: jax.Array, gt_valid: jax.Array, key: jax.Array, *,
                background_label: int, num_samples: int = 512, positive_fraction: float = 0.25,
                positive_iou: float = 0.5, num_mask_rois: int = 128) -> dict[str, jax.Array]:
  """The RoI head's training sample (mmdet's `MaxIoUAssigner` at 0.5 / 0.5 with low-quality
  matches of IoU >= 0.5, then `RandomSampler` with the ground truths added as proposals).

  The ground truths are prepended to the proposals; a candidate whose best IoU with a ground truth
  is >= positive_iou is positive for it (a ground truth also claims the candidates of its best
  IoU, when that is >= positive_iou), the others negative. Up to int(num_samples ·
  positive_fraction) random positives fill the first slots, random negatives the following ones,
  up to num_samples; slots left over weigh 0. Every real ground truth is a positive candidate of
  itself.

  Args:
    proposals: float (B, P, 4) (x0, y0, x1, y1), input pixels.
    proposal_valid: bool (B, P).
    gt_boxes: float (B, G, 4), padded (crowd regions left out).
    gt_labels: int32 (B, G), classes 0 .. num_classes - 1.
    gt_valid: bool (B, G), the real ground truths.
    key: a PRNG key.
    background_label: the class of negatives (mmdet: num_classes).
    num_samples: S, RoIs per image.
    positive_fraction: the largest share of positives.
    positive_iou: the IoU that makes a candidate positive (mmdet's pos_iou_thr = neg_iou_thr =
      min_pos_iou).
    num_mask_rois: Q, the first slots (where the positives are) handed to the mask branch.

  Returns:
    A dict of
      'rois': float32 (B, S, 4), 0 in unfilled slots;
      'labels': int32 (B, S), the matched class for positives, background_label otherwise;
      'matched_gt': int32 (B, S), the index into G of a positive's ground truth (0 elsewhere);
      'positive': bool (B, S), the positive slots (the first ones of each row);
      'weights': float32 (B, S), 1 for filled slots, 0 for unfilled;
      'mask_valid': bool (B, Q), which of the first Q slots (the mask branch's) hold a
        positive.
  """
  if proposals.ndim != 3 or gt_boxes.ndim != 3 or proposals.shape[0] != gt_boxes.shape[0]:
    raise ValueError(f'proposals (B, P, 4) and gt_boxes (B, G, 4) must share B, got shapes '
                     f'{proposals.shape} and {gt_boxes.shape}')
  num_positive = int(num_samples * positive_fraction)
  if not 0 < num_mask_rois <= num_samples:
    raise ValueError(f'num_mask_rois must be in [1, num_samples={num_samples}], got '
                     f'{num_mask_rois}')
  candidates = jnp.concatenate([gt_boxes, proposals], axis=1).astype(jnp.float32)
  candidate_valid = jnp.concatenate([gt_valid, proposal_valid], axis=1)
  num_candidates = candidates.shape[1]

  def assign(boxes, valid, gts, real):
    return assign_lib.max_iou_assign(
        boxes, valid, gts, real, jnp.zeros_like(real), positive_iou=positive_iou,
        negative_iou=positive_iou, min_best_iou=positive_iou, crowd_iof=0.0)

  assignment = jax.vmap(assign)(candidates, candidate_valid, gt_boxes.astype(jnp.float32),
                                gt_valid)
  positive_key, negative_key = jax.random.split(key)
  positives, positive_picked = _random_pick(assignment.positive, positive_key,
                                            min(num_positive, num_candidates))
  negatives, negative_picked = _random_pick(assignment.negative, negative_key,
                                            min(num_samples, num_candidates))
  # Positives, then negatives, then the unfilled: the first S picked entries in that order.
  order = jnp.concatenate([positives, negatives], axis=1)
  picked = jnp.concatenate([positive_picked, negative_picked], axis=1)
  is_positive = jnp.concatenate([positive_picked, jnp.zeros_like(negative_picked)], axis=1)
  shortfall = ((0, 0), (0, max(num_samples - order.shape[1], 0)))  # Fewer candidates than S.
  order, picked, is_positive = (jnp.pad(x, shortfall) for x in (order, picked, is_positive))
  rank = jnp.where(picked, order.shape[1] - jnp.arange(order.shape[1]), -1)
  _, slots = jax.lax.top_k(rank, num_samples)
  take = lambda values: jnp.take_along_axis(values, slots, axis=1)
  filled, positive = take(picked), take(is_positive)
  index = take(order)
  matched = jnp.take_along_axis(assignment.matched, index, axis=1)
  labels = jnp.take_along_axis(gt_labels.astype(jnp.int32), matched, axis=1)
  rois = jnp.take_along_axis(candidates, index[..., None], axis=1) * filled[..., None]
  return {
      'rois': jax.lax.stop_gradient(rois),
      'labels': jnp.where(positive, labels, background_label).astype(jnp.int32),
      'matched_gt': jnp.where(positive, matched, 0),
      'positive': positive,
      'weights': filled.astype(jnp.float32),
      'mask_valid': positive[:, :num_mask_rois],
  }
