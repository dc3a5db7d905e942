"""Tests of the TensorFlow image ops against their definitions and PIL's implementations."""

import io

import numpy as np
from PIL import Image
import pytest
import skimage.data

from secvit_jax.data import ops
from secvit_jax.data import pipeline

import tensorflow as tf  # pylint: disable=g-bad-import-order


@pytest.fixture(scope='module')
def photo():
  """A real photograph, uint8 (120, 180, 3) (scikit-image's chelsea, downscaled)."""
  return np.asarray(Image.fromarray(skimage.data.chelsea()).resize((180, 120), Image.BICUBIC))


def encode(image: np.ndarray, fmt: str) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format=fmt, **({'quality': 95} if fmt == 'JPEG' else {}))
  return buffer.getvalue()


def seed(i: int) -> tf.Tensor:
  return tf.constant([i, 12345], tf.int64)


def test_accelerators_are_hidden_from_tensorflow():
  pipeline.hide_accelerators_from_tensorflow()
  assert {device.device_type for device in tf.config.get_visible_devices()} == {'CPU'}


@pytest.mark.parametrize('fmt', ['JPEG', 'PNG', 'BMP'])
def test_decode_image_gives_rgb_uint8(photo, fmt):
  decoded = ops.decode_image(tf.constant(encode(photo, fmt)), accurate=True).numpy()
  assert decoded.shape == photo.shape and decoded.dtype == np.uint8
  # Lossless formats round-trip exactly; JPEG decodes as PIL does (accurate DCT).
  reference = np.asarray(Image.open(io.BytesIO(encode(photo, fmt))).convert('RGB'))
  np.testing.assert_array_equal(decoded, reference)


def test_decode_image_makes_grayscale_rgb(photo):
  gray = photo[..., 0]
  decoded = ops.decode_image(tf.constant(encode(gray, 'PNG'))).numpy()
  assert decoded.shape == photo.shape
  for channel in range(3):
    np.testing.assert_array_equal(decoded[..., channel], gray)


def test_sample_crop_box_follows_scale_and_ratio():
  height, width = 300, 451
  areas, ratios = [], []
  for i in range(200):
    top, left, crop_h, crop_w = (int(v) for v in ops.sample_crop_box(
        seed(i), height, width, (0.08, 1.0), (3 / 4, 4 / 3)))
    assert 0 <= top and top + crop_h <= height and 0 <= left and left + crop_w <= width
    areas.append(crop_h * crop_w / (height * width))
    ratios.append(crop_w / crop_h)
  # Rounding the sides to pixels moves area and ratio a little beyond the bounds.
  assert 0.07 <= min(areas) and max(areas) <= 1.0
  assert 0.72 <= min(ratios) and max(ratios) <= 1.38
  # timm's algorithm (first fitting draw of 10) accepts small windows more often: on a 300 × 451
  # image its mean area fraction is 0.388 (2e4 draws with Python's `random`).
  assert np.mean(areas) == pytest.approx(0.388, abs=0.04)


def test_sample_crop_box_is_deterministic_and_varies_with_seed():
  boxes = [tuple(int(v) for v in ops.sample_crop_box(seed(i), 300, 451)) for i in (0, 0, 1)]
  assert boxes[0] == boxes[1] != boxes[2]


def test_sample_crop_box_falls_back_to_the_central_crop():
  # A 2:1 window of the whole area never fits a square image: the central 2:1 crop it is.
  box = [int(v) for v in ops.sample_crop_box(seed(0), 10, 10, (1.0, 1.0), (2.0, 2.0))]
  assert box == [2, 0, 5, 10]
  box = [int(v) for v in ops.sample_crop_box(seed(0), 10, 40, (1.0, 1.0), (0.5, 0.5))]
  assert box == [0, 17, 10, 5]  # Too wide: the full height and a width of height × max ratio.


@pytest.mark.parametrize('fmt', ['JPEG', 'PNG'])
def test_decode_and_random_resized_crop_crops_the_sampled_window(photo, fmt):
  data = tf.constant(encode(photo, fmt))
  decoded = ops.decode_image(data)
  for i in range(3):
    out = ops.decode_and_random_resized_crop(data, seed(i), 64)
    assert out.shape == (64, 64, 3) and out.dtype == tf.uint8
    top, left, crop_h, crop_w = (int(v) for v in ops.sample_crop_box(
        seed(i), photo.shape[0], photo.shape[1]))
    expected = ops.resize_bicubic(decoded[top:top + crop_h, left:left + crop_w], 64, 64)
    diff = np.abs(out.numpy().astype(float) - expected.numpy())
    # The fused JPEG decoder may differ by a level or so along the window's edge blocks.
    assert diff.mean() < (0.5 if fmt == 'JPEG' else 1e-9)
    np.testing.assert_array_equal(
        ops.random_resized_crop(decoded, seed(i), 64).numpy(), expected.numpy())


@pytest.mark.parametrize('out_size', [(50, 75), (200, 150)])
def test_resize_bicubic_matches_pil(photo, out_size):
  reference = np.asarray(Image.fromarray(photo).resize(out_size[::-1], Image.BICUBIC), float)
  exact = ops.resize_bicubic(tf.constant(photo), *out_size, pil_rounding=True).numpy()
  # Equal to PIL's but for a level on under 1% of the values (2 on a rare upscaled pixel).
  assert np.abs(exact - reference).max() <= 2 and np.mean(exact != reference) < 0.01
  fast = ops.resize_bicubic(tf.constant(photo), *out_size).numpy()
  assert np.abs(fast - reference).max() <= 2 and np.mean(fast != reference) < 0.3


def test_resize_shorter_side_and_center_crop_shapes(photo):
  resized = ops.resize_shorter_side(tf.constant(photo), 64)
  assert resized.shape == (64, int(64 * 180 / 120), 3)  # 96
  tall = ops.resize_shorter_side(tf.constant(photo.transpose(1, 0, 2)), 64)
  assert tall.shape == (96, 64, 3)
  grid = tf.reshape(tf.range(7 * 10), [7, 10, 1])
  crop = ops.center_crop(grid, 4).numpy()[..., 0]
  # Offsets round((7 - 4) / 2) = 2 (ties to even), round((10 - 4) / 2) = 3.
  np.testing.assert_array_equal(crop, np.arange(70).reshape(7, 10)[2:6, 3:7])


def test_random_flip_mirrors_about_half_the_time(photo):
  image = tf.constant(photo)
  flipped = 0
  for i in range(40):
    out = ops.random_flip_left_right(image, seed(i)).numpy()
    if np.array_equal(out, photo[:, ::-1]):
      flipped += 1
    else:
      np.testing.assert_array_equal(out, photo)
  assert 10 <= flipped <= 30


def test_normalize_uses_imagenet_statistics():
  image = tf.constant([[[0, 0, 0], [255, 255, 255]]], tf.uint8)
  out = ops.normalize(image).numpy()
  mean, std = np.array(ops.IMAGENET_MEAN), np.array(ops.IMAGENET_STD)
  np.testing.assert_allclose(out[0, 0], -mean / std, rtol=1e-6)
  np.testing.assert_allclose(out[0, 1], (1 - mean) / std, rtol=1e-6)
  assert out.dtype == np.float32


def test_random_erasing_fills_one_rectangle_with_noise():
  image = tf.fill([64, 96, 3], 7.0)
  np.testing.assert_array_equal(ops.random_erasing(image, seed(0), 0.0).numpy(), image.numpy())
  fractions = []
  for i in range(20):
    out = ops.random_erasing(image, seed(i), 1.0).numpy()
    erased = np.any(out != 7.0, axis=-1)
    rows, cols = np.nonzero(erased)
    # One axis-aligned rectangle, filled with standard normal noise.
    box = erased[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert box.all()
    fractions.append(erased.mean())
    noise = out[erased]
    assert abs(noise.mean()) < 0.3 and 0.7 < noise.std() < 1.3
  assert 0.015 <= min(fractions) and max(fractions) <= 0.36
  again = ops.random_erasing(image, seed(3), 1.0).numpy()
  np.testing.assert_array_equal(again, ops.random_erasing(image, seed(3), 1.0).numpy())


def test_random_erasing_probability():
  image = tf.zeros([16, 16, 3])
  erased = sum(bool(np.any(ops.random_erasing(image, seed(i), 0.25).numpy() != 0))
               for i in range(200))
  assert 30 <= erased <= 70  # Binomial(200, 0.25): mean 50, std 6.1.
