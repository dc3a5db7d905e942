"""Tests of RandAugment's ops against PIL's implementations, and of its sampling."""

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
import pytest
import skimage.data

from secvit_jax.data import randaugment

import tensorflow as tf  # pylint: disable=g-bad-import-order


@pytest.fixture(scope='module')
def photo():
  """A real photograph, uint8 (120, 180, 3) (scikit-image's chelsea, downscaled)."""
  return np.asarray(Image.fromarray(skimage.data.chelsea()).resize((180, 120), Image.BICUBIC))


def seed(i: int) -> tf.Tensor:
  return tf.constant([i, 12345], tf.int64)



def test_parse_randaugment():
  params = randaugment.parse_randaugment('rand-m9-mstd0.5-inc1')
  assert params == randaugment.RandAugmentParams(num_layers=2, magnitude=9.0, magnitude_std=0.5,
                                         magnitude_max=10.0, prob=0.5, increasing=True)
  params = randaugment.parse_randaugment('rand-n3-m7-mstd101-mmax8-p0.7')
  assert (params.num_layers, params.magnitude, params.magnitude_max, params.prob,
          params.increasing) == (3, 7.0, 8.0, 0.7, False)
  assert params.magnitude_std == math.inf
  with pytest.raises(ValueError, match="'auto-m9'"):
    randaugment.parse_randaugment('auto-m9')
  with pytest.raises(ValueError, match="unknown section 'w0'"):
    randaugment.parse_randaugment('rand-m9-w0')


@pytest.mark.parametrize('name, tf_op, pil_op', [
    ('invert', randaugment.invert, ImageOps.invert),
    ('autocontrast', randaugment.auto_contrast, ImageOps.autocontrast),
    ('equalize', randaugment.equalize, ImageOps.equalize),
    ('posterize2', lambda x: randaugment.posterize(x, tf.constant(2)),
     lambda x: ImageOps.posterize(x, 2)),
    ('posterize0', lambda x: randaugment.posterize(x, tf.constant(0)),
     lambda x: Image.fromarray(np.zeros_like(np.asarray(x)))),
    ('solarize', lambda x: randaugment.solarize(x, tf.constant(100)),
     lambda x: ImageOps.solarize(x, 100)),
    ('solarize_add', lambda x: randaugment.solarize_add(x, tf.constant(60)),
     lambda x: Image.fromarray(np.where(np.asarray(x) < 128,
                                        np.minimum(np.asarray(x).astype(int) + 60, 255),
                                        np.asarray(x)).astype(np.uint8))),
    ('color', lambda x: randaugment.color(x, tf.constant(0.3)),
     lambda x: ImageEnhance.Color(x).enhance(0.3)),
    ('contrast', lambda x: randaugment.contrast(x, tf.constant(1.7)),
     lambda x: ImageEnhance.Contrast(x).enhance(1.7)),
    ('brightness', lambda x: randaugment.brightness(x, tf.constant(1.4)),
     lambda x: ImageEnhance.Brightness(x).enhance(1.4)),
    ('sharpness', lambda x: randaugment.sharpness(x, tf.constant(1.8)),
     lambda x: ImageEnhance.Sharpness(x).enhance(1.8)),
    ('translate_x', lambda x: randaugment.translate_x(x, tf.constant(-20.0)),
     lambda x: x.transform(x.size, Image.AFFINE, (1, 0, -20, 0, 1, 0),
                           fillcolor=randaugment.FILL_COLOR)),
    ('translate_y', lambda x: randaugment.translate_y(x, tf.constant(15.0)),
     lambda x: x.transform(x.size, Image.AFFINE, (1, 0, 0, 0, 1, 15),
                           fillcolor=randaugment.FILL_COLOR)),
])
def test_pointwise_and_enhance_ops_match_pil(photo, name, tf_op, pil_op):
  # A dim, low-contrast version of the photo, so that autocontrast and equalize change it.
  image = (photo // 2 + 40).astype(np.uint8)
  out = tf_op(tf.constant(image)).numpy()
  reference = np.asarray(pil_op(Image.fromarray(image)))
  assert out.shape == image.shape and out.dtype == np.uint8, name
  diff = np.abs(out.astype(int) - reference)
  # Equal but for rounding: at most one level on a few pixels.
  assert diff.max() <= 1 and diff.mean() < 0.05, (name, diff.max(), diff.mean())


@pytest.mark.parametrize('name, tf_op, pil_op', [
    ('rotate', lambda x: randaugment.rotate(x, tf.constant(20.0)),
     lambda x: x.rotate(20, resample=Image.BILINEAR, fillcolor=randaugment.FILL_COLOR)),
    ('shear_x', lambda x: randaugment.shear_x(x, tf.constant(0.25)),
     lambda x: x.transform(x.size, Image.AFFINE, (1, 0.25, 0, 0, 1, 0), Image.BILINEAR,
                           fillcolor=randaugment.FILL_COLOR)),
    ('shear_y', lambda x: randaugment.shear_y(x, tf.constant(-0.2)),
     lambda x: x.transform(x.size, Image.AFFINE, (1, 0, 0, -0.2, 1, 0), Image.BILINEAR,
                           fillcolor=randaugment.FILL_COLOR)),
])
def test_geometric_ops_match_pil(photo, name, tf_op, pil_op):
  out = tf_op(tf.constant(photo)).numpy().astype(float)
  reference = np.asarray(pil_op(Image.fromarray(photo)), float)
  # Same geometry and fill; PIL samples at pixel centres, TF at pixel corners (< 1/2 pixel apart).
  assert np.abs(out - reference).mean() < 6.0, name
  assert np.median(np.abs(out - reference)) <= 3.0, name


def test_every_randaugment_op_keeps_shape_and_dtype(photo):
  image = tf.constant(photo)
  branches = randaugment._randaugment_ops(  # pylint: disable=protected-access
      image, tf.constant(9.0), tf.constant(-1.0), True, 0.45)
  outputs = [branch() for branch in branches]
  assert len(outputs) == randaugment.NUM_RANDAUGMENT_OPS
  for i, out in enumerate(outputs):
    assert out.shape == photo.shape and out.dtype == tf.uint8, i
    assert not np.array_equal(out.numpy(), photo), i  # Magnitude 9 changes the image.


def test_randaugment_increasing_magnitudes():
  level = tf.constant(9.0)
  image = tf.constant(np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1))
  # Posterize 'increasing': 4 - int(0.9 * 4) = 1 bit kept; Solarize: threshold 256 - 230 = 26.
  branches = randaugment._randaugment_ops(  # pylint: disable=protected-access
      image, level, tf.constant(1.0), True, 0.45)
  assert set(np.unique(branches[4]().numpy())) == {0, 128}
  solarized = branches[5]().numpy()[..., 0].reshape(-1)
  np.testing.assert_array_equal(solarized[:26], np.arange(26))
  np.testing.assert_array_equal(solarized[26:], 255 - np.arange(26, 256))
  # Brightness factor 1 ± 0.81.
  brighter = branches[9]().numpy().astype(float)
  np.testing.assert_allclose(brighter[..., 0].reshape(-1)[:100], np.floor(np.arange(100) * 1.81))


def test_rand_augment_is_deterministic_and_random(photo):
  params = randaugment.parse_randaugment('rand-m9-mstd0.5-inc1')
  image = tf.constant(photo)
  first = randaugment.rand_augment(image, seed(5), params).numpy()
  np.testing.assert_array_equal(first, randaugment.rand_augment(image, seed(5), params).numpy())
  outputs = [randaugment.rand_augment(image, seed(i), params).numpy() for i in range(40)]
  changed = [out.tobytes() for out in outputs if not np.array_equal(out, photo)]
  # Each of the 2 layers applies an op with probability 0.5: 1/4 of the images stay untouched
  # (Binomial(40, 0.25): mean 10, std 2.7); the others almost all differ from each other.
  assert 3 <= 40 - len(changed) <= 18
  assert len(set(changed)) >= len(changed) - 2
  never = randaugment.RandAugmentParams(prob=0.0)
  np.testing.assert_array_equal(randaugment.rand_augment(image, seed(1), never).numpy(), photo)
