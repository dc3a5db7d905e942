"""Tests of the detection building blocks: anchors, boxes, assignment, focal loss, NMS, decoding,
and the RetinaNet modules' shapes and initialization."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from secvit_jax.detection import anchors as anchor_lib
from secvit_jax.detection import assign as assign_lib
from secvit_jax.detection import boxes as box_ops
from secvit_jax.detection import nms
from secvit_jax.heads import retinanet


# ------------------------------------------------------------------------------------------------
# Anchors.
# ------------------------------------------------------------------------------------------------


def test_base_anchors_have_mmdets_geometry():
  generator = anchor_lib.AnchorGenerator()
  assert generator.num_per_location == 9
  base = generator.base_anchors(0)  # Stride 8: sides 32 · 2^(k/3), ratio-major.
  sides = 32 * 2.0**(np.arange(3) / 3)
  widths = np.concatenate([sides * math.sqrt(2), sides, sides / math.sqrt(2)])
  heights = np.concatenate([sides / math.sqrt(2), sides, sides * math.sqrt(2)])
  np.testing.assert_allclose(base[:, 2] - base[:, 0], widths, rtol=1e-6)
  np.testing.assert_allclose(base[:, 3] - base[:, 1], heights, rtol=1e-6)
  np.testing.assert_allclose(base[:, :2], -base[:, 2:], rtol=1e-6)  # Centred on the origin.
  np.testing.assert_allclose(base[3], [-16, -16, 16, 16])  # Ratio 1, scale 4.
  np.testing.assert_allclose(generator.base_anchors(4)[3], [-256, -256, 256, 256])


def test_anchor_count_and_order_follow_the_head_outputs():
  generator = anchor_lib.AnchorGenerator()
  sizes = anchor_lib.feature_sizes(1344, 1344, generator.strides)
  assert sizes == ((168, 168), (84, 84), (42, 42), (21, 21), (11, 11))
  assert generator.anchors(sizes).shape == (9 * (168**2 + 84**2 + 42**2 + 21**2 + 11**2), 4)

  sizes = ((3, 5), (2, 3), (1, 2), (1, 1), (1, 1))
  all_anchors = generator.anchors(sizes)
  # Anchor a of location (row 2, column 4) of level 0, and of (1, 2) of level 1.
  np.testing.assert_allclose(all_anchors[(2 * 5 + 4) * 9 + 7],
                             generator.base_anchors(0)[7] + [32, 16, 32, 16])
  level_1 = 9 * 15
  np.testing.assert_allclose(all_anchors[level_1 + (1 * 3 + 2) * 9 + 1],
                             generator.base_anchors(1)[1] + [32, 16, 32, 16])
  # A head output channel a·K + k at (r, c) lands on anchor a of (r, c), class k.
  num_classes = 2
  maps = tuple(jnp.arange(h * w * 9 * num_classes, dtype=jnp.float32).reshape(1, h, w, -1)
               + 1000 * level for level, (h, w) in enumerate(sizes))
  flat = retinanet.flatten_levels(maps, num_classes)
  assert flat.shape == (1, len(all_anchors), num_classes)
  assert flat[0, (2 * 5 + 4) * 9 + 7, 1] == maps[0][0, 2, 4, 7 * num_classes + 1]
  assert flat[0, level_1 + (1 * 3 + 2) * 9 + 1, 0] == maps[1][0, 1, 2, 1 * num_classes]


def test_valid_anchors_cover_the_image_padded_to_32():
  generator = anchor_lib.AnchorGenerator()
  sizes = anchor_lib.feature_sizes(128, 128, generator.strides)  # 16², 8², 4², 2², 1².
  valid = np.asarray(generator.valid(sizes, jnp.array([[100, 60], [128, 128]])))
  assert valid.shape == (2, len(generator.anchors(sizes)))
  assert valid[1].all()
  level_0 = valid[0, :16 * 16 * 9].reshape(16, 16, 9)
  # 100 × 60 pads to 128 × 64: rows < 16, columns < 8 at stride 8.
  assert level_0[:, :8].all() and not level_0[:, 8:].any()
  level_2 = valid[0, 9 * (256 + 64):9 * (256 + 64 + 16)].reshape(4, 4, 9)
  assert level_2[:, :2].all() and not level_2[:, 2:].any()  # ceil(64 / 32) = 2 columns.


# ------------------------------------------------------------------------------------------------
# Boxes.
# ------------------------------------------------------------------------------------------------


def test_iou_and_iof_on_hand_made_boxes():
  a = jnp.array([[0., 0., 10., 10.], [0., 0., 0., 0.]])
  b = jnp.array([[5., 5., 15., 15.], [0., 0., 10., 10.], [20., 20., 30., 30.], [0., 0., 5., 20.]])
  np.testing.assert_allclose(box_ops.pairwise_iou(a, b),
                             [[25 / 175, 1, 0, 50 / 150], [0, 0, 0, 0]], rtol=1e-6)
  np.testing.assert_allclose(box_ops.pairwise_iof(a, b)[0], [0.25, 1, 0, 0.5], rtol=1e-6)
  np.testing.assert_allclose(box_ops.area(b), [100, 100, 100, 100])


def test_box_encoding_round_trip_and_formula():
  rng = np.random.default_rng(0)
  centers = rng.uniform(0, 500, (64, 2))
  sizes = rng.uniform(4, 300, (64, 2))
  anchors = np.concatenate([centers - sizes / 2, centers + sizes / 2], axis=1).astype(np.float32)
  boxes = anchors + rng.normal(0, 20, (64, 4)).astype(np.float32)
  boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
  deltas = box_ops.encode(anchors, boxes)
  np.testing.assert_allclose(box_ops.decode(anchors, deltas), boxes, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(box_ops.encode(jnp.array([[0., 0., 10., 20.]]),
                                            jnp.array([[5., 0., 25., 40.]])),
                             [[1.0, 0.5, math.log(2), math.log(2)]], rtol=1e-6)
  # With means and stds, and mmdet's bound on the size change.
  stds = (0.1, 0.1, 0.2, 0.2)
  scaled = box_ops.encode(anchors, boxes, stds=stds)
  np.testing.assert_allclose(scaled, np.asarray(deltas) / np.asarray(stds), rtol=1e-5)
  huge = box_ops.decode(jnp.array([[0., 0., 10., 10.]]), jnp.array([[0., 0., 10., -10.]]))
  np.testing.assert_allclose(huge[0, 2] - huge[0, 0], 10 * 1000 / 16, rtol=1e-5)
  np.testing.assert_allclose(huge[0, 3] - huge[0, 1], 10 * 16 / 1000, rtol=1e-5)
  np.testing.assert_allclose(box_ops.clip(jnp.array([[-5., 3., 50., 70.]]), 60, 40),
                             [[0, 3, 40, 60]])


# ------------------------------------------------------------------------------------------------
# Assignment.
# ------------------------------------------------------------------------------------------------


def test_max_iou_assignment_on_hand_made_boxes():
  anchors = jnp.array([
      [0., 0., 10., 10.],     # 0: IoU 1 with box 0 -> positive, box 0.
      [1., 0., 11., 10.],     # 1: IoU 0.818 with box 0 -> positive.
      [6., 0., 16., 10.],     # 2: IoU 0.25 with box 0 -> negative.
      [4., 0., 14., 10.],     # 3: IoU 0.4286 with box 0 -> ignored (between 0.4 and 0.5).
      [50., 50., 60., 60.],   # 4: box 1's best (IoU 0.25 < 0.5) -> positive, box 1.
      [100., 100., 110., 110.],  # 5: overlaps nothing -> negative.
      [0., 0., 10., 10.],     # 6: not valid -> neither.
      [200., 200., 210., 210.],  # 7: inside the crowd box -> ignored.
      [185., 185., 195., 195.],  # 8: 25% inside the crowd -> negative.
  ])
  valid = jnp.array([True] * 6 + [False, True, True])
  gt_boxes = jnp.array([[0., 0., 10., 10.], [50., 50., 70., 70.], [190., 190., 230., 230.],
                        [0., 0., 10., 10.]])
  gt_mask = jnp.array([True, True, True, False])  # The last one is padding.
  crowd = jnp.array([False, False, True, False])
  result = assign_lib.max_iou_assign(anchors, valid, gt_boxes, gt_mask, crowd)
  np.testing.assert_array_equal(result.positive, [1, 1, 0, 0, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(result.negative, [0, 0, 1, 0, 0, 1, 0, 0, 1])
  assert list(np.asarray(result.matched)[[0, 1, 4]]) == [0, 0, 1]

  # crowd_iof <= 0: crowd boxes dropped, the anchor inside one becomes a negative.
  dropped = assign_lib.max_iou_assign(anchors, valid, gt_boxes, gt_mask, crowd, crowd_iof=0)
  assert bool(dropped.negative[7]) and not bool(dropped.positive[7])


def test_each_box_takes_its_best_anchors_and_a_later_box_wins_a_tie():
  anchors = jnp.array([[0., 0., 10., 10.], [30., 0., 40., 10.], [60., 0., 70., 10.]])
  gt_boxes = jnp.array([[0., 0., 40., 10.], [30., 0., 70., 10.]])  # Both have IoU 0.25 best.
  result = assign_lib.max_iou_assign(anchors, jnp.ones(3, bool), gt_boxes, jnp.ones(2, bool),
                                     jnp.zeros(2, bool))
  np.testing.assert_array_equal(result.positive, [True, True, True])
  # Anchor 1 ties (IoU 0.25 with both); box 1 claims it last.
  np.testing.assert_array_equal(result.matched, [0, 1, 1])
  # No real box: every valid anchor is negative.
  empty = assign_lib.max_iou_assign(anchors, jnp.array([True, True, False]), gt_boxes,
                                    jnp.zeros(2, bool), jnp.zeros(2, bool))
  np.testing.assert_array_equal(empty.negative, [True, True, False])
  assert not empty.positive.any()


# ------------------------------------------------------------------------------------------------
# Loss.
# ------------------------------------------------------------------------------------------------


def test_focal_loss_matches_the_formula():
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 3, (50, 4)).astype(np.float32)
  targets = (rng.uniform(size=(50, 4)) < 0.3).astype(np.float32)
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  p_t = np.where(targets == 1, p, 1 - p)
  alpha_t = np.where(targets == 1, 0.25, 0.75)
  expected = -alpha_t * (1 - p_t)**2 * np.log(p_t)
  import optax  # pylint: disable=g-import-not-at-top
  np.testing.assert_allclose(optax.sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0),
                             expected, rtol=1e-4, atol=1e-7)


def _one_level_settings(**fields):
  """Settings with a single-level pyramid of stride 8 and one anchor per location (16 × 16)."""
  generator = anchor_lib.AnchorGenerator(strides=(8,), octave_base_scale=2, scales_per_octave=1,
                                         ratios=(1.0,))
  return retinanet.RetinaNetSettings(anchors=generator, **fields)


def test_retinanet_loss_on_a_hand_made_case():
  settings = _one_level_settings()
  num_classes = 3
  rng = np.random.default_rng(2)
  class_map = rng.normal(0, 1, (1, 4, 4, num_classes)).astype(np.float32)
  box_map = rng.normal(0, 0.1, (1, 4, 4, 4)).astype(np.float32)
  # One box exactly on the anchor of location (1, 2): [16-8, 8-8, 16+8, 8+8].
  batch = {'boxes': jnp.array([[[8., 0., 24., 16.], [0., 0., 0., 0.]]]),
           'labels': jnp.array([[2, 0]]), 'box_mask': jnp.array([[True, False]]),
           'crowd': jnp.array([[False, False]]), 'image_size': jnp.array([[32, 32]])}
  total, metrics = jax.jit(lambda c, b: retinanet.loss((c,), (b,), batch, settings))(
      class_map, box_map)
  anchors = settings.anchors.anchors(((4, 4),))
  iou = np.asarray(box_ops.pairwise_iou(jnp.asarray(anchors), batch['boxes'][0, :1]))[:, 0]
  positive = iou >= 0.5
  negative = iou < 0.4
  assert positive.sum() == 1 and positive[1 * 4 + 2]
  logits = class_map.reshape(16, num_classes).astype(np.float64)
  targets = np.zeros((16, num_classes))
  targets[positive, 2] = 1
  p = 1 / (1 + np.exp(-logits))
  p_t = np.where(targets == 1, p, 1 - p)
  focal = -np.where(targets == 1, 0.25, 0.75) * (1 - p_t)**2 * np.log(p_t)
  class_loss = focal[positive | negative].sum()
  box_loss = np.abs(box_map.reshape(16, 4)[positive]).sum()  # The box's deltas are 0.
  np.testing.assert_allclose(metrics['class_loss'], class_loss, rtol=1e-4)
  np.testing.assert_allclose(metrics['box_loss'], box_loss, rtol=1e-4)
  np.testing.assert_allclose(total, class_loss + box_loss, rtol=1e-4)
  assert metrics['positives'] == 1


def test_retinanet_loss_gradients_are_finite_with_padding_only():
  settings = _one_level_settings()
  batch = {'boxes': jnp.zeros((2, 3, 4)), 'labels': jnp.zeros((2, 3), jnp.int32),
           'box_mask': jnp.zeros((2, 3), bool), 'crowd': jnp.zeros((2, 3), bool),
           'image_size': jnp.array([[32, 32], [20, 12]])}
  maps = jnp.zeros((2, 4, 4, 2)), jnp.zeros((2, 4, 4, 4))
  grads = jax.jit(jax.grad(lambda c, b: retinanet.loss((c,), (b,), batch, settings)[0],
                           argnums=(0, 1)))(*maps)
  assert all(np.isfinite(g).all() for g in grads)
  assert not np.asarray(grads[1]).any()  # No positive: no box gradient.


# ------------------------------------------------------------------------------------------------
# NMS and decoding.
# ------------------------------------------------------------------------------------------------


def _numpy_nms(boxes, scores, labels, valid, iou_threshold, max_outputs):
  """Brute force: sort, then keep a box unless a kept box of its class overlaps it too much."""
  order = [i for i in np.argsort(-scores, kind='stable') if valid[i]]
  kept = []
  for i in order:
    if all(labels[j] != labels[i] or _iou(boxes[i], boxes[j]) <= iou_threshold for j in kept):
      kept.append(i)
  return kept[:max_outputs]


def _iou(a, b):
  w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
  return w * h / max(union, 1e-6)


@pytest.mark.parametrize('seed, count, max_outputs', [(0, 300, 50), (1, 40, 100), (2, 500, 100)])
def test_device_nms_matches_brute_force_numpy(seed, count, max_outputs):
  rng = np.random.default_rng(seed)
  # Clustered boxes, so that many overlap; three classes; a fifth invalid.
  centers = rng.uniform(0, 200, (8, 2))[rng.integers(0, 8, count)] + rng.normal(0, 6, (count, 2))
  sizes = rng.uniform(10, 60, (count, 2))
  boxes = np.concatenate([centers - sizes / 2, centers + sizes / 2], axis=1).astype(np.float32)
  scores = rng.permutation(count).astype(np.float32) / count  # Distinct scores.
  labels = rng.integers(0, 3, count).astype(np.int32)
  valid = rng.uniform(size=count) > 0.2
  run = jax.jit(lambda *a: nms.batched_nms(*a, iou_threshold=0.5, max_outputs=max_outputs))
  indices, kept = (np.asarray(x) for x in run(boxes, scores, labels, valid))
  expected = _numpy_nms(boxes, scores, labels, valid, 0.5, max_outputs)
  assert kept.sum() == len(expected)
  np.testing.assert_array_equal(indices[kept], expected)
  assert not kept[len(expected):].any() and kept[:len(expected)].all()


def test_detect_decodes_the_confident_anchors_and_suppresses_duplicates():
  settings = _one_level_settings(max_detections=5)
  class_map = np.full((1, 4, 4, 3), -10.0, np.float32)
  class_map[0, 1, 2, 1] = 3.0  # Anchor (1, 2) (box [8, 0, 24, 16]), class 1, score 0.95.
  class_map[0, 1, 1, 1] = 2.0  # Anchor (1, 1) ([0, 0, 16, 16]): IoU 1/3 with it, kept.
  class_map[0, 2, 2, 0] = 1.0  # Another class.
  box_map = np.zeros((1, 4, 4, 4), np.float32)
  box_map[0, 1, 2] = [0.25, 0, 0, 0]  # Shifted right by a quarter of its width: x0 = 12.
  detect = jax.jit(lambda c, b, size: retinanet.detect((c,), (b,), size, settings))
  out = detect(class_map, box_map, jnp.array([[32, 20]]))
  np.testing.assert_array_equal(out['kept'][0], [True, True, True, False, False])
  np.testing.assert_array_equal(out['labels'][0, :3], [1, 1, 0])
  np.testing.assert_allclose(out['scores'][0, :3], 1 / (1 + np.exp(-np.array([3., 2., 1.]))),
                             rtol=1e-6)
  np.testing.assert_allclose(out['boxes'][0, 0], [12, 0, 20, 16])  # Clipped to width 20.
  np.testing.assert_allclose(out['boxes'][0, 2], [8, 8, 20, 24])
  assert not out['scores'][0, 3:].any()
  # A duplicate of the best box of the same class is suppressed, of another class kept.
  class_map[0, 1, 2, 2] = 2.5
  class_map[0, 1, 2, 0] = -10.0
  duplicate = detect(class_map, box_map, jnp.array([[32, 32]]))
  np.testing.assert_array_equal(duplicate['labels'][0, :4], [1, 2, 1, 0])


# ------------------------------------------------------------------------------------------------
# Modules.
# ------------------------------------------------------------------------------------------------


def test_head_shapes_parameters_and_mmdets_initialization():
  head = retinanet.RetinaNetHead(num_classes=80)
  maps = [jnp.zeros((2, s, s, 256)) for s in (16, 8, 4, 2, 1)]
  variables = jax.jit(head.init)(jax.random.key(0), maps)
  params = variables['params']
  count = sum(x.size for x in jax.tree.leaves(params))
  conv = 3 * 3 * 256 * 256 + 256
  assert count == 8 * conv + (3 * 3 * 256 * 720 + 720) + (3 * 3 * 256 * 36 + 36)
  np.testing.assert_allclose(params['class_logits']['bias'], -math.log(99), rtol=1e-6)
  assert not params['box_deltas']['bias'].any() and not params['class_conv_0']['bias'].any()
  assert abs(float(np.std(params['class_conv_0']['kernel'])) - 0.01) < 1e-3
  class_maps, box_maps = jax.eval_shape(head.apply, variables, maps)
  assert [m.shape for m in class_maps] == [(2, s, s, 720) for s in (16, 8, 4, 2, 1)]
  assert [m.shape for m in box_maps] == [(2, s, s, 36) for s in (16, 8, 4, 2, 1)]
  assert class_maps[0].dtype == jnp.float32


def test_settings_from_config_fields():
  settings = retinanet.RetinaNetSettings.from_config({
      'anchor_strides': [8, 16, 32, 64, 128], 'octave_base_scale': 2.0, 'anchor_ratios': [1.0],
      'nms_iou': 0.6})
  assert settings.anchors.num_per_location == 3 and settings.anchors.octave_base_scale == 2
  assert settings.nms_iou == 0.6 and settings.max_detections == 100
  with pytest.raises(ValueError, match=r"unknown RetinaNet setting\(s\) \['nms_threshold'\]"):
    retinanet.RetinaNetSettings.from_config({'nms_threshold': 0.5})


def test_draw_detections_outlines_each_box_in_its_class_colour():
  from secvit_jax.tasks import detection as task_lib  # pylint: disable=g-import-not-at-top
  image = np.zeros((60, 80, 3), np.uint8)
  detections = {'boxes': np.array([[10., 20., 50., 40.], [60., 5., 70., 15.]]),
                'scores': np.array([0.9, 0.1]), 'labels': np.array([3, 1])}
  picture = np.asarray(task_lib.draw_detections(image, detections, ['a', 'b', 'c', 'd'],
                                                min_score=0.3))
  assert picture.shape == image.shape
  colour = task_lib.class_colour(3)
  assert tuple(picture[40, 30]) == colour and tuple(picture[30, 10]) == colour  # Box edges.
  assert not picture[30, 30].any()  # Inside the box.
  assert not picture[10, 65].any() and not picture[5, 60].any()  # Below min_score: not drawn.
  assert (picture[5:20, 10:30] == colour).all(axis=-1).any()  # The label's background.
  assert task_lib.class_colour(1) != colour
