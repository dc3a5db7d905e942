"""Tests of Mask R-CNN's building blocks besides RoIAlign: instance-mask crops, mask targets and
pasting (detection/masks.py), proposals (detection/proposals.py) and RoI / anchor sampling
(detection/sampling.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from secvit_jax.detection import boxes as box_ops
from secvit_jax.detection import masks
from secvit_jax.detection import proposals
from secvit_jax.detection import sampling

# ------------------------------------------------------------------------------------------------
# Crops of ground-truth masks, mask targets, pasting.
# ------------------------------------------------------------------------------------------------

L_SHAPE = np.array([[1, 0, 0, 0, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0, 0, 0, 0],
                    [1, 1, 1, 1, 1, 1, 0, 0],
                    [1, 1, 1, 1, 1, 1, 1, 0],
                    [0, 1, 1, 1, 1, 1, 1, 1]], bool)


def _scene_with(shape: np.ndarray, top: int, left: int, height: int = 20, width: int = 24):
  """A (1, height, width) bitmap holding `shape` with its top-left pixel at (top, left)."""
  scene = np.zeros((1, height, width), bool)
  scene[0, top:top + shape.shape[0], left:left + shape.shape[1]] = shape
  return scene


def test_crop_of_a_filled_rectangle():
  scene = np.zeros((1, 32, 32), bool)
  scene[0, 8:24, 4:20] = True  # Pixels [4, 20) × [8, 24).
  assert np.all(masks.crop_masks_to_boxes(scene, np.array([[4., 8., 20., 24.]]), 5) == 1)
  # Over the whole image, 8 × 8 bins centred at 2, 6, ..., 30: the rectangle holds x, y in 6-18
  # (columns 1-4) and y in 10-22 (rows 2-5).
  crop = masks.crop_masks_to_boxes(scene, np.array([[0., 0., 32., 32.]]), 8)
  expected = np.zeros((8, 8), np.uint8)
  expected[2:6, 1:5] = 1
  np.testing.assert_array_equal(crop[0], expected)
  assert crop.dtype == np.uint8


def test_crop_samples_the_boxs_pixels_and_is_box_relative():
  scene = _scene_with(L_SHAPE, top=5, left=9)
  box = np.array([[9., 5., 17., 13.]])
  # As many bins as pixels: bin centres are pixel centres, the crop is the box's pixels.
  np.testing.assert_array_equal(masks.crop_masks_to_boxes(scene, box, 8)[0], L_SHAPE)
  # Twice the image (nearest) with twice the box: the same crop.
  doubled = scene.repeat(2, axis=1).repeat(2, axis=2)
  np.testing.assert_array_equal(masks.crop_masks_to_boxes(doubled, 2 * box, 8)[0], L_SHAPE)
  # A horizontal flip of image and box mirrors the crop.
  flipped_box = np.array([[24 - 17., 5., 24 - 9., 13.]])
  np.testing.assert_array_equal(
      masks.crop_masks_to_boxes(scene[:, :, ::-1], flipped_box, 8)[0], L_SHAPE[:, ::-1])


def test_crop_of_a_flipped_mask_is_the_mirrored_crop():
  rng = np.random.default_rng(0)
  scenes = rng.random((6, 16, 20)) > 0.5
  # Integer boxes and a power-of-two size keep every coordinate exact.
  corners = rng.integers(0, 9, (6, 2))
  boxes = np.concatenate([corners, corners + rng.integers(2, 12, (6, 2))], axis=1).astype(float)
  flipped_boxes = boxes[:, [2, 1, 0, 3]] * [-1, 1, -1, 1] + [20, 0, 20, 0]
  crops = masks.crop_masks_to_boxes(scenes, boxes, 16)
  np.testing.assert_array_equal(
      masks.crop_masks_to_boxes(scenes[:, :, ::-1], flipped_boxes, 16), crops[:, :, ::-1])


def test_crop_rejects_mismatched_inputs():
  with pytest.raises(ValueError, match='boxes'):
    masks.crop_masks_to_boxes(np.zeros((2, 8, 8), bool), np.zeros((3, 4)), 4)
  with pytest.raises(ValueError, match='masks'):
    masks.crop_masks_to_boxes(np.zeros((8, 8), bool), np.zeros((1, 4)), 4)
  assert masks.crop_masks_to_boxes(np.zeros((0, 8, 8), bool), np.zeros((0, 4)), 4).shape == (
      0, 4, 4)


def _reference_paste(mask: np.ndarray, box: np.ndarray, height: int, width: int) -> np.ndarray:
  """One mask pasted pixel by pixel: bilinear at the pixel's centre in the box's bins, zeros past
  the outer bins, 0 outside the box."""
  size = mask.shape[0]
  padded = np.pad(mask, 1)
  pasted = np.zeros((height, width), np.float64)
  for row in range(height):
    for column in range(width):
      x, y = column + 0.5, row + 0.5
      if not (box[0] <= x <= box[2] and box[1] <= y <= box[3]):
        continue
      u = (x - box[0]) / (box[2] - box[0]) * size - 0.5 + 1  # +1: the padding.
      v = (y - box[1]) / (box[3] - box[1]) * size - 0.5 + 1
      u0, v0 = int(np.floor(u)), int(np.floor(v))
      fu, fv = u - u0, v - v0
      pasted[row, column] = ((1 - fv) * ((1 - fu) * padded[v0, u0] + fu * padded[v0, u0 + 1])
                             + fv * ((1 - fu) * padded[v0 + 1, u0] + fu * padded[v0 + 1, u0 + 1]))
  return pasted


def test_paste_of_a_full_mask_fills_the_pixels_centred_in_the_box():
  box = np.array([[10.3, 5.7, 30.2, 20.4]])
  pasted = masks.paste_masks(np.ones((1, 28, 28)), box, 40, 50)
  expected = np.zeros((40, 50), bool)
  expected[6:20, 10:30] = True  # Centres r + 0.5 in [5.7, 20.4], c + 0.5 in [10.3, 30.2].
  np.testing.assert_array_equal(pasted[0], expected)
  # A centre on the box's edge reads half its outer bin (zero padding): 0.5, in; on a corner a
  # quarter: out.
  edges = masks.paste_masks(np.ones((1, 28, 28)), np.array([[2.5, 2.5, 9.5, 9.5]]), 12, 12)
  assert edges[0, 2, 5] and edges[0, 5, 9] and not edges[0, 2, 2] and not edges[0, 9, 9]


def test_paste_matches_a_pixelwise_reference():
  rng = np.random.default_rng(1)
  probs = rng.random((4, 7, 7)).astype(np.float32)
  boxes = np.array([[2.2, 3.9, 17.5, 11.0], [-4., -3., 6.5, 8.], [15., 1., 30., 19.],
                    [5., 5., 5., 9.]])  # Partly outside the image; empty.
  pasted = masks.paste_masks(probs, boxes, 16, 24, threshold=0.4)
  for mask, box, result in zip(probs, boxes, pasted):
    np.testing.assert_array_equal(result, _reference_paste(mask, box, 16, 24) >= 0.4)
  assert not pasted[3].any()


def test_crop_then_paste_recovers_the_mask():
  scene = _scene_with(L_SHAPE, top=5, left=9)
  box = np.array([[9., 5., 17., 13.]])
  crop = masks.crop_masks_to_boxes(scene, box, 8)
  np.testing.assert_array_equal(masks.paste_masks(crop, box, 20, 24), scene)
  rectangle = np.zeros((1, 30, 40), bool)
  rectangle[0, 7:19, 12:33] = True
  box = np.array([[12., 7., 33., 19.]])
  np.testing.assert_array_equal(
      masks.paste_masks(masks.crop_masks_to_boxes(rectangle, box, 28), box, 30, 40), rectangle)


def test_mask_targets_resample_the_matched_crop_over_the_roi():
  rng = np.random.default_rng(2)
  crops = (rng.random((2, 3, 16, 16)) > 0.5).astype(np.uint8)
  # Ground-truth boxes of 64 × 32 and 32 × 16 pixels: dyadic scales keep coordinates exact.
  gt_boxes = np.array([[[8., 16., 72., 48.], [0., 0., 32., 16.], [0., 0., 0., 0.]]] * 2)
  rois = np.array([[[8., 16., 72., 48.],  # The ground-truth box itself.
                    [8., 16., 40., 48.],  # Its left half.
                    [-8., 8., 40., 32.],  # Partly outside it.
                    [0., 0., 32., 16.]]] * 2)
  matched = np.array([[0, 0, 0, 1], [0, 0, 0, 1]], np.int32)
  targets = jax.jit(masks.mask_targets, static_argnames='output_size')(
      crops, gt_boxes, rois, matched, output_size=8)
  assert targets.shape == (2, 4, 8, 8) and targets.dtype == jnp.float32
  for b in range(2):
    for r in range(4):
      gt = gt_boxes[b, matched[b, r]]
      # The RoI in the crop's cells, read as an image of 16 × 16 pixels.
      scale = 16 / (gt[2:] - gt[:2])
      roi_in_crop = np.concatenate([(rois[b, r, :2] - gt[:2]) * scale,
                                    (rois[b, r, 2:] - gt[:2]) * scale])
      expected = masks.crop_masks_to_boxes(crops[b, matched[b, r]][None], roi_in_crop[None], 8)
      np.testing.assert_array_equal(targets[b, r], expected[0])
  # A full crop's left half, and a box reaching past the ground truth: zeros outside it.
  full = np.ones((1, 1, 16, 16), np.uint8)
  targets = masks.mask_targets(full, np.array([[[0., 0., 16., 16.]]]),
                               np.array([[[0., 0., 8., 16.], [-16., 0., 16., 16.]]]),
                               np.zeros((1, 2), np.int32), output_size=4)
  np.testing.assert_array_equal(targets[0, 0], np.ones((4, 4)))
  np.testing.assert_array_equal(targets[0, 1], np.tile([0., 0., 1., 1.], (4, 1)))


# ------------------------------------------------------------------------------------------------
# Proposals.
# ------------------------------------------------------------------------------------------------

LEVEL_ANCHORS = np.array([[0., 0., 10., 10.],
                          [1., 0., 11., 10.],  # IoU 0.82 with the first.
                          [20., 20., 30., 30.],
                          [40., 40., 50., 50.],
                          [60., 0., 70., 10.]], np.float32)


def _propose(scores, deltas, anchors, image_size, **settings):
  fn = jax.jit(proposals.generate_proposals,
               static_argnames=('pre_nms_top_k', 'nms_threshold', 'post_nms_top_k'))
  return fn([jnp.asarray(s) for s in scores], [jnp.asarray(d) for d in deltas],
            [jnp.asarray(a) for a in anchors], jnp.asarray(image_size), **settings)


def test_proposals_are_the_best_survivors_of_per_level_nms():
  # Level 0 as above; level 1 the same anchors again, lower scores.
  logits = np.array([[3., 4., 2., -1., 1.]], np.float32)
  zero = np.zeros((1, 5, 4), np.float32)
  boxes, scores, valid = _propose([logits, logits - 2.5], [zero, zero],
                                  [LEVEL_ANCHORS, LEVEL_ANCHORS], [[100, 100]],
                                  pre_nms_top_k=4, post_nms_top_k=6)
  assert boxes.shape == (1, 6, 4) and scores.shape == (1, 6) and valid.shape == (1, 6)
  # Level 0: anchor 1 (4.0) suppresses anchor 0 (3.0); anchor 3 (-1.0) is not among the top 4.
  # Level 1 keeps its own anchor 1 (1.5): levels do not suppress each other.
  expected = [(0, 1, 4.), (0, 2, 2.), (0, 4, 1.), (1, 1, 1.5), (1, 2, -0.5), (1, 4, -1.5)]
  expected.sort(key=lambda item: -item[2])
  np.testing.assert_allclose(boxes[0], LEVEL_ANCHORS[[anchor for _, anchor, _ in expected]])
  np.testing.assert_allclose(scores[0], jax.nn.sigmoid(np.array([s for *_, s in expected])),
                             rtol=1e-6)
  assert np.all(valid)


def test_proposals_decode_clip_to_each_image_and_pad():
  anchors = LEVEL_ANCHORS[2:4]  # Disjoint: NMS keeps both.
  deltas = np.zeros((2, 2, 4), np.float32)
  deltas[:, 0] = [0.5, 0., np.log(2.), 0.]  # Centre 5 px right, twice as wide.
  logits = np.array([[1., 0.], [1., 0.]], np.float32)
  boxes, scores, valid = _propose([logits], [deltas], [anchors], [[100, 100], [45, 28]],
                                  pre_nms_top_k=10, post_nms_top_k=4)
  moved = box_ops.decode(jnp.asarray(anchors[0]), jnp.asarray(deltas[0, 0]))
  np.testing.assert_allclose(moved, [20., 20., 40., 30.])
  np.testing.assert_allclose(boxes[0, :2], [moved, [40., 40., 50., 50.]])
  # The second image is 28 px wide and 45 px high.
  np.testing.assert_allclose(boxes[1, :2], [[20., 20., 28., 30.], [28., 40., 28., 45.]])
  np.testing.assert_array_equal(valid, [[True, True, False, False]] * 2)
  assert not np.any(boxes[:, 2:]) and not np.any(scores[:, 2:])


def test_proposals_carry_no_gradient():
  logits = jnp.asarray([[3., 4., 2., -1., 1.]])
  deltas = jnp.full((1, 5, 4), 0.1)

  def total(logits, deltas):
    boxes, scores, _ = proposals.generate_proposals(
        [logits], [deltas], [jnp.asarray(LEVEL_ANCHORS)], jnp.asarray([[64, 64]]),
        pre_nms_top_k=5, post_nms_top_k=3)
    return jnp.sum(boxes) + jnp.sum(scores)

  logit_gradient, delta_gradient = jax.grad(total, argnums=(0, 1))(logits, deltas)
  assert not np.any(logit_gradient) and not np.any(delta_gradient)
  with pytest.raises(ValueError, match='level 0'):
    proposals.generate_proposals([logits], [deltas[:, :4]], [jnp.asarray(LEVEL_ANCHORS)],
                                 jnp.asarray([[64, 64]]), pre_nms_top_k=5)


# ------------------------------------------------------------------------------------------------
# Sampling.
# ------------------------------------------------------------------------------------------------


def _sample_rois(proposal_boxes, proposal_valid, gt_boxes, gt_labels, gt_valid, seed, **settings):
  fn = jax.jit(sampling.sample_rois, static_argnames=(
      'background_label', 'num_samples', 'positive_fraction', 'positive_iou', 'num_mask_rois'))
  return jax.tree.map(np.asarray, fn(
      jnp.asarray(proposal_boxes, jnp.float32), jnp.asarray(proposal_valid),
      jnp.asarray(gt_boxes, jnp.float32), jnp.asarray(gt_labels, jnp.int32),
      jnp.asarray(gt_valid), jax.random.key(seed), background_label=5, **settings))


def _jittered(rng, box, count, spread):
  return box + rng.uniform(-spread, spread, (count, 4))


def test_sample_rois_balances_positives_and_negatives():
  rng = np.random.default_rng(3)
  gt_boxes = np.array([[[10., 10., 50., 50.], [60., 20., 120., 90.], [0., 0., 0., 0.]]] * 2)
  gt_valid = np.array([[True, True, False], [True, True, False]])
  # Image 0: 300 proposals near the ground truths (mostly positive) and 100 away from them;
  # image 1: only 6 valid proposals, 2 of them positive.
  near = np.concatenate([_jittered(rng, gt_boxes[0, 0], 150, 3),
                         _jittered(rng, gt_boxes[0, 1], 150, 4)])
  far = _jittered(rng, np.array([150., 150., 190., 190.]), 100, 5)
  proposal_boxes = np.stack([np.concatenate([near, far]),
                             np.concatenate([near[:1], near[150:151], far[:4], np.ones((394, 4))])])
  proposal_valid = np.ones((2, 400), bool)
  proposal_valid[1, 6:] = False
  sample = _sample_rois(proposal_boxes, proposal_valid, gt_boxes, [[1, 3, 0]] * 2, gt_valid, 0,
                        num_samples=64, num_mask_rois=16)
  assert sample['rois'].shape == (2, 64, 4) and sample['mask_valid'].shape == (2, 16)
  candidates = np.concatenate([gt_boxes, proposal_boxes], axis=1)
  iou = np.stack([np.asarray(box_ops.pairwise_iou(jnp.asarray(sample['rois'][b]),
                                                  jnp.asarray(gt_boxes[b, :2])))
                  for b in range(2)])  # (2, 64, 2)
  positive, weights = sample['positive'], sample['weights']
  # Image 0: exactly 64 samples, 16 (25 %) positive; image 1: its 2 ground truths, 2 positive
  # and 4 negative proposals; the rest unfilled.
  np.testing.assert_array_equal(weights.sum(axis=1), [64, 8])
  np.testing.assert_array_equal(positive.sum(axis=1), [16, 4])
  for b in range(2):
    filled, pos = weights[b] > 0, positive[b]
    np.testing.assert_array_equal(pos, np.arange(64) < pos.sum())  # Positives first.
    assert np.all(iou[b, pos].max(axis=1) >= 0.5)
    assert np.all(iou[b, filled & ~pos].max(axis=1) < 0.5)
    matched = sample['matched_gt'][b, pos]
    np.testing.assert_array_equal(iou[b, pos].argmax(axis=1), matched)
    np.testing.assert_array_equal(sample['labels'][b],
                                  np.where(pos, np.array([1, 3])[sample['matched_gt'][b]], 5))
    assert not np.any(sample['rois'][b, ~filled])
    # Every sampled RoI is one of the candidates.
    for roi in sample['rois'][b, filled]:
      assert np.any(np.all(np.isclose(candidates[b], roi), axis=1))
    # The mask branch gets the positive slots: its first 16, valid where positive.
    np.testing.assert_array_equal(sample['mask_valid'][b], pos[:16])
    assert sample['mask_valid'][b].sum() == min(pos.sum(), 16)
  # Image 1's ground truths are both among its positives.
  for gt in gt_boxes[1, :2]:
    assert np.any(np.all(np.isclose(sample['rois'][1, positive[1]], gt), axis=1))


def test_sample_rois_draws_differently_per_key_and_caps_positives():
  rng = np.random.default_rng(4)
  gt_boxes = np.array([[[10., 10., 50., 50.]]])
  proposal_boxes = np.concatenate([_jittered(rng, gt_boxes[0, 0], 100, 3),
                                   _jittered(rng, np.array([60., 60., 90., 90.]), 100, 5)])[None]
  draws = [_sample_rois(proposal_boxes, np.ones((1, 200), bool), gt_boxes, [[2]], [[True]], seed,
                        num_samples=40, num_mask_rois=10) for seed in (0, 1)]
  for sample in draws:
    assert sample['positive'].sum() == 10 and sample['weights'].sum() == 40
  assert not np.array_equal(draws[0]['rois'], draws[1]['rois'])
  # Fewer candidates (1 + 3) than samples: all of them, then unfilled slots.
  few = _sample_rois(proposal_boxes[:, 98:101], np.ones((1, 3), bool), gt_boxes, [[2]], [[True]],
                     0, num_samples=16, num_mask_rois=4)
  np.testing.assert_array_equal(few['weights'][0], np.arange(16) < 4)
  np.testing.assert_array_equal(few['positive'][0], np.arange(16) < 3)
  np.testing.assert_array_equal(few['mask_valid'][0], [True, True, True, False])


def test_sample_anchors_counts():
  rng = np.random.default_rng(5)
  labels = rng.choice([-1, 0, 1], size=(3, 500), p=[0.3, 0.6, 0.1]).astype(np.int32)
  labels[1] = np.where(labels[1] == 1, 0, labels[1])  # No positives.
  labels[2, :] = -1
  labels[2, :5] = 1
  labels[2, 5:9] = 0  # 5 positives and 4 negatives.
  sample = jax.jit(sampling.sample_anchors, static_argnames=('num_samples', 'positive_fraction'))
  positive, negative = map(np.asarray, sample(jnp.asarray(labels), jax.random.key(0),
                                              num_samples=64))
  np.testing.assert_array_equal(positive.sum(axis=1), [32, 0, 5])
  np.testing.assert_array_equal(negative.sum(axis=1), [32, 64, 4])
  assert np.all(labels[positive] == 1) and np.all(labels[negative] == 0)
  other, _ = sample(jnp.asarray(labels), jax.random.key(1), num_samples=64)
  assert not np.array_equal(other, positive)
