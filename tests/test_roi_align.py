"""Tests of RoIAlign (detection/roi_align.py) against a direct NumPy transcription of mmcv's
aligned RoIAlign with a fixed sampling ratio, and of the pyramid's level mapping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from secvit_jax.detection import roi_align as roi_lib

def _bilinear(feature_map: np.ndarray, y: float, x: float) -> np.ndarray:
  """mmcv's `bilinear_interpolate`: one sample of an (H, W, C) map."""
  height, width = feature_map.shape[:2]
  if y < -1.0 or y > height or x < -1.0 or x > width:
    return np.zeros(feature_map.shape[-1])
  y, x = max(y, 0.0), max(x, 0.0)
  y_low, x_low = int(y), int(x)
  if y_low >= height - 1:
    y_low = y_high = height - 1
    y = float(y_low)
  else:
    y_high = y_low + 1
  if x_low >= width - 1:
    x_low = x_high = width - 1
    x = float(x_low)
  else:
    x_high = x_low + 1
  ly, lx = y - y_low, x - x_low
  return ((1 - ly) * ((1 - lx) * feature_map[y_low, x_low] + lx * feature_map[y_low, x_high])
          + ly * ((1 - lx) * feature_map[y_high, x_low] + lx * feature_map[y_high, x_high]))


def _reference_roi_align(feature_map: np.ndarray, box: np.ndarray, output_size: int,
                         spatial_scale: float, ratio: int) -> np.ndarray:
  """One box's bins, looping over bins and samples (aligned=True)."""
  x0, y0, x1, y1 = box * spatial_scale - 0.5
  bin_h, bin_w = (y1 - y0) / output_size, (x1 - x0) / output_size
  out = np.zeros((output_size, output_size, feature_map.shape[-1]))
  for i in range(output_size):
    for j in range(output_size):
      for a in range(ratio):
        for b in range(ratio):
          y = y0 + i * bin_h + (a + 0.5) * bin_h / ratio
          x = x0 + j * bin_w + (b + 0.5) * bin_w / ratio
          out[i, j] += _bilinear(feature_map, y, x)
  return out / ratio**2


def _random_boxes(rng, count, height, width, stride):
  """Boxes in input pixels: inside, partly outside (also past -1 and H) and tiny."""
  centres = rng.uniform([-0.3 * width, -0.3 * height], [1.3 * width, 1.3 * height], (count, 2))
  sizes = rng.uniform(0.1, 0.8, (count, 2)) * [width, height]
  sizes[:3] = [[0.2, 0.3], [1.0, 0.5], [0.0, 2.0]]  # Tiny (in cells), and one empty.
  boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1) * stride
  return boxes.astype(np.float32)


def test_roi_align_matches_mmcv_transcription():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(2, 9, 11, 3)).astype(np.float32)
  boxes = np.stack([_random_boxes(rng, 10, 9, 11, 8) for _ in range(2)])
  align = jax.jit(roi_lib.roi_align,
                  static_argnames=('output_size', 'spatial_scale', 'sampling_ratio'))
  for output_size, ratio in ((3, 2), (2, 1)):
    result = align(features, boxes, output_size=output_size, spatial_scale=1 / 8,
                   sampling_ratio=ratio)
    assert result.shape == (2, 10, output_size, output_size, 3)
    for b in range(2):
      for k in range(10):
        np.testing.assert_allclose(
            result[b, k], _reference_roi_align(features[b], boxes[b, k], output_size, 1 / 8, ratio),
            atol=1e-5, err_msg=f'box {boxes[b, k]}')


def test_features_get_the_adjoint_gradient_and_boxes_none():
  rng = np.random.default_rng(1)
  features = jnp.asarray(rng.normal(size=(1, 12, 10, 4)), jnp.float32)
  boxes = jnp.asarray(_random_boxes(rng, 6, 12, 10, 4))[None]

  def loss(features, boxes):
    return jnp.sum(roi_lib.roi_align(features, boxes, output_size=2, spatial_scale=0.25)**2)

  feature_gradient, box_gradient = jax.grad(loss, argnums=(0, 1))(features, boxes)
  assert np.all(np.isfinite(feature_gradient))
  # RoIAlign is linear in the features, so the loss is quadratic: <dL/dF, F> = 2 L.
  np.testing.assert_allclose(jnp.sum(feature_gradient * features), 2 * loss(features, boxes),
                             rtol=1e-5)
  assert not np.any(box_gradient)


def test_roi_levels_follow_mmdets_scales():
  sides = np.array([1., 55., 56., 111., 112., 223., 224., 447., 448., 2000.])
  boxes = np.stack([np.zeros_like(sides), np.zeros_like(sides), sides, sides], axis=-1)
  np.testing.assert_array_equal(roi_lib.roi_levels(jnp.asarray(boxes)),
                                [0, 0, 0, 0, 1, 1, 2, 2, 3, 3])
  # Scale is sqrt(w · h): 28 × 448 has scale 112, level 1; an empty box is level 0.
  np.testing.assert_array_equal(
      roi_lib.roi_levels(jnp.asarray([[0., 0., 28., 448.], [5., 5., 5., 9.]])), [1, 0])
  assert roi_lib.roi_levels(jnp.asarray([[0., 0., 448., 448.]]), num_levels=3)[0] == 2


def test_multilevel_reads_each_box_on_its_level():
  rng = np.random.default_rng(2)
  strides = (4, 8, 16, 32)
  # A 128 × 96 input: maps 32 × 24 down to 4 × 3, each level a different random map.
  features = [rng.normal(size=(2, 128 // s, 96 // s, 5)).astype(np.float32) for s in strides]
  boxes = np.array([[[10., 10., 40., 40.], [0., 0., 120., 130.], [20., 30., 260., 250.],
                     [-20., -10., 500., 480.]],
                    [[30., 2., 150., 120.], [4., 4., 6., 9.], [50., 60., 70., 80.],
                     [0., 0., 60., 60.]]], np.float32)
  levels = np.asarray(roi_lib.roi_levels(jnp.asarray(boxes)))
  assert set(levels.ravel()) == {0, 1, 2, 3}
  result = roi_lib.multilevel_roi_align([jnp.asarray(f) for f in features], jnp.asarray(boxes),
                                        output_size=3, strides=strides)
  assert result.shape == (2, 4, 3, 3, 5)
  for b in range(2):
    for k in range(4):
      level = levels[b, k]
      np.testing.assert_allclose(
          result[b, k], _reference_roi_align(features[level][b], boxes[b, k], 3,
                                             1 / strides[level], 2), atol=1e-5)


def test_roi_align_rejects_bad_inputs():
  features = jnp.zeros((2, 4, 4, 1))
  with pytest.raises(ValueError, match='boxes'):
    roi_lib.roi_align(features, jnp.zeros((2, 3)), output_size=2, spatial_scale=1.0)
  with pytest.raises(ValueError, match=r'features\[0\]'):
    roi_lib.roi_align(features, jnp.zeros((1, 3, 4)), output_size=2, spatial_scale=1.0)
  with pytest.raises(ValueError, match='strides'):
    roi_lib.multilevel_roi_align([features], jnp.zeros((2, 3, 4)), output_size=2)
