"""TensorFlow image ops of the input pipelines, written for `tf.data` map functions (graph mode,
any image size): decoding, resizing, crops, flips, normalization, random erasing.

Layout: an image is HWC with 3 RGB channels; uint8 in [0, 255] up to `normalize`, float32 (ImageNet
normalized) after it. The classification ops follow the release's (timm 0.9.10) training and
evaluation transforms; RandAugment is in `randaugment.py`.

Randomness is stateless: every random op takes `seed`, a (2,) int32/int64 tensor as the
`tf.random.stateless_*` ops use, and its output is a function of its inputs and that seed alone
(the pipeline derives one seed per example from the run's seed and the example's position, which
makes the batches reproducible and cheap to resume).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Seed = tf.Tensor  # (2,) int32 or int64.


@functools.lru_cache(maxsize=32)
def _full_array(values: tuple[float, ...], shape: tuple[int, ...], dtype: str) -> np.ndarray:
  return np.broadcast_to(np.asarray(values, dtype), shape).copy()


def per_channel(values: Sequence[float], shape: tf.TensorShape, dtype=tf.float32) -> tf.Tensor:
  """A per-channel constant for an (H, W, C) image of static `shape`: full size when the shape is
  known. TensorFlow's CPU kernels broadcast along the last axis ~20 times slower than they apply
  a same-shape elementwise op, so the pipeline's per-channel arithmetic uses full-size constants.
  """
  if shape.is_fully_defined():
    return tf.constant(_full_array(tuple(values), tuple(shape.as_list()), dtype.name))
  return tf.constant(values, dtype)


# ------------------------------------------------------------------------------------------------
# Decoding, resizing, cropping, flipping, normalization.
# ------------------------------------------------------------------------------------------------


def decode_image(image_bytes: tf.Tensor, accurate: bool = False) -> tf.Tensor:
  """Decodes a JPEG, PNG, GIF (first frame), BMP or WebP image to uint8 (H, W, 3) RGB.

  Args:
    image_bytes: scalar string tensor, the encoded file.
    accurate: decode JPEGs with the accurate integer DCT (`dct_method='INTEGER_ACCURATE'`), which
      gives exactly PIL's (libjpeg's default) pixels; the default fast DCT differs from them by
      about 1.3/255 per pixel and decodes faster.
  """
  def jpeg():
    return tf.io.decode_jpeg(image_bytes, channels=3,
                             dct_method='INTEGER_ACCURATE' if accurate else '')

  def other():
    return tf.io.decode_image(image_bytes, channels=3, expand_animations=False)

  image = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
  image.set_shape([None, None, 3])
  return image


def resize_bicubic(image: tf.Tensor, height, width, pil_rounding: bool = False) -> tf.Tensor:
  """Antialiased bicubic resize of a uint8 (H, W, 3) image to uint8 (height, width, 3).

  PIL's `Image.resize(..., BICUBIC)` (what the release uses) widens the kernel when shrinking
  (antialiasing), as this does, and resizes in two passes, horizontal then vertical, rounding to
  integers after each.

  Args:
    image: uint8 (H, W, 3).
    height, width: int32 scalars, the output size.
    pil_rounding: also round between the passes as PIL does: the result then equals PIL's but for
      one level on a fraction of a percent of the values (in one float pass, on ~15% of them),
      at about 1.5-2× the cost. Evaluation uses it; training does not need it.
  """
  def rounded(x):
    return tf.round(tf.clip_by_value(x, 0.0, 255.0))

  if pil_rounding:
    image = rounded(tf.image.resize(image, tf.stack([tf.shape(image)[0], width]),
                                    method='bicubic', antialias=True))
  resized = tf.image.resize(image, tf.stack([height, width]), method='bicubic', antialias=True)
  return tf.cast(rounded(resized), tf.uint8)


def resize_shorter_side(image: tf.Tensor, size, pil_rounding: bool = False) -> tf.Tensor:
  """Resizes uint8 (H, W, 3) so that its shorter side is `size`, as torchvision's `Resize(size)`.

  The longer side becomes int(size * longer / shorter) (truncated, as torchvision does);
  `pil_rounding` as in `resize_bicubic`.
  """
  shape = tf.shape(image)
  height, width = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
  size_f = tf.cast(size, tf.float64)
  new_height = tf.where(height <= width, size_f, tf.floor(size_f * height / width))
  new_width = tf.where(height <= width, tf.floor(size_f * width / height), size_f)
  return resize_bicubic(image, tf.cast(new_height, tf.int32), tf.cast(new_width, tf.int32),
                        pil_rounding)


def center_crop(image: tf.Tensor, size) -> tf.Tensor:
  """The central (size, size) window of an (H, W, C) image with H, W >= size.

  The offsets are round((H - size) / 2) and round((W - size) / 2) with ties to even, as
  torchvision's `CenterCrop`.
  """
  shape = tf.shape(image)
  top = tf.cast(tf.round(tf.cast(shape[0] - size, tf.float32) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(shape[1] - size, tf.float32) / 2.0), tf.int32)
  return image[top:top + size, left:left + size]


def sample_crop_box(seed: Seed, height, width, scale: Sequence[float] = (0.08, 1.0),
                    ratio: Sequence[float] = (3 / 4, 4 / 3), attempts: int = 10):
  """Draws a random resized crop's window as timm's `RandomResizedCrop.get_params`.

  Up to `attempts` windows of area uniform in `scale` × H·W and aspect ratio (w / h) log-uniform in
  `ratio` are drawn; the first that fits is placed uniformly at random. If none fits, the window is
  the central crop with the aspect ratio clamped into `ratio`.

  Args:
    seed: (2,) stateless seed.
    height, width: int32 scalars, the image size.
    scale, ratio: (min, max) bounds.
    attempts: windows drawn before falling back to the central crop.

  Returns:
    (top, left, crop_height, crop_width), int32 scalars.
  """
  seeds = tf.random.experimental.stateless_split(seed, 4)
  height_f, width_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  area = tf.random.stateless_uniform([attempts], seeds[0], scale[0], scale[1]) * height_f * width_f
  aspect = tf.exp(tf.random.stateless_uniform([attempts], seeds[1], math.log(ratio[0]),
                                              math.log(ratio[1])))
  crop_w = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  crop_h = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  fits = (crop_w <= width) & (crop_h <= height) & (crop_w >= 1) & (crop_h >= 1)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  found = tf.reduce_any(fits)
  crop_h, crop_w = crop_h[first], crop_w[first]
  top = tf.random.stateless_uniform([], seeds[2], 0, tf.maximum(height - crop_h + 1, 1),
                                    dtype=tf.int32)
  left = tf.random.stateless_uniform([], seeds[3], 0, tf.maximum(width - crop_w + 1, 1),
                                     dtype=tf.int32)
  # Fallback: the whole image, cut to the nearest allowed aspect ratio, centred.
  in_ratio = width_f / height_f
  fallback_w = tf.where(in_ratio > ratio[1], tf.cast(tf.round(height_f * ratio[1]), tf.int32),
                        width)
  fallback_h = tf.where(in_ratio < ratio[0], tf.cast(tf.round(width_f / ratio[0]), tf.int32),
                        height)
  return (tf.where(found, top, (height - fallback_h) // 2),
          tf.where(found, left, (width - fallback_w) // 2),
          tf.where(found, crop_h, fallback_h), tf.where(found, crop_w, fallback_w))


def decode_and_random_resized_crop(image_bytes: tf.Tensor, seed: Seed, size: int,
                                   scale: Sequence[float] = (0.08, 1.0),
                                   ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tf.Tensor:
  """Random resized crop of an encoded image, resized to uint8 (size, size, 3) (bicubic).

  JPEGs are decoded only inside the window (`tf.image.decode_and_crop_jpeg`), which skips most of
  the decoding work; other formats are decoded whole and then cropped. The window is drawn by
  `sample_crop_box`.
  """
  def jpeg():
    shape = tf.image.extract_jpeg_shape(image_bytes)
    top, left, crop_h, crop_w = sample_crop_box(seed, shape[0], shape[1], scale, ratio)
    return tf.image.decode_and_crop_jpeg(image_bytes, tf.stack([top, left, crop_h, crop_w]),
                                         channels=3)

  def other():
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    shape = tf.shape(image)
    top, left, crop_h, crop_w = sample_crop_box(seed, shape[0], shape[1], scale, ratio)
    return image[top:top + crop_h, left:left + crop_w]

  crop = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
  crop.set_shape([None, None, 3])
  return resize_bicubic(crop, size, size)


def random_resized_crop(image: tf.Tensor, seed: Seed, size: int,
                        scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tf.Tensor:
  """Random resized crop of a decoded uint8 (H, W, 3) image to uint8 (size, size, 3) (bicubic)."""
  shape = tf.shape(image)
  top, left, crop_h, crop_w = sample_crop_box(seed, shape[0], shape[1], scale, ratio)
  return resize_bicubic(image[top:top + crop_h, left:left + crop_w], size, size)


def random_flip_left_right(image: tf.Tensor, seed: Seed) -> tf.Tensor:
  """Mirrors an (H, W, C) image left-right with probability 0.5."""
  return tf.image.stateless_random_flip_left_right(image, seed)


def normalize(image: tf.Tensor) -> tf.Tensor:
  """uint8 (H, W, 3) -> float32 (H, W, 3): (x / 255 - mean) / std with ImageNet's mean and std."""
  scale = per_channel([1.0 / (255.0 * std) for std in IMAGENET_STD], image.shape)
  offset = per_channel([-mean / std for mean, std in zip(IMAGENET_MEAN, IMAGENET_STD)],
                        image.shape)
  return tf.cast(image, tf.float32) * scale + offset


def random_erasing(image: tf.Tensor, seed: Seed, prob: float,
                   area: Sequence[float] = (0.02, 1 / 3),
                   aspect: Sequence[float] = (0.3, 1 / 0.3), attempts: int = 10) -> tf.Tensor:
  """timm's `RandomErasing(prob, mode='pixel')` on a normalized float32 (H, W, C) image.

  With probability `prob`, up to `attempts` rectangles of area uniform in `area` × H·W and aspect
  ratio (h / w) log-uniform in `aspect` are drawn; the first smaller than the image is placed
  uniformly at random and filled with per-pixel standard normal noise. If none fits, the image is
  left unchanged.
  """
  seeds = tf.random.experimental.stateless_split(seed, 6)
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  target = (tf.random.stateless_uniform([attempts], seeds[0], area[0], area[1])
            * tf.cast(height * width, tf.float32))
  ratio = tf.exp(tf.random.stateless_uniform([attempts], seeds[1], math.log(aspect[0]),
                                             math.log(aspect[1])))
  erase_h = tf.cast(tf.round(tf.sqrt(target * ratio)), tf.int32)
  erase_w = tf.cast(tf.round(tf.sqrt(target / ratio)), tf.int32)
  fits = (erase_w < width) & (erase_h < height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  erase_h, erase_w = erase_h[first], erase_w[first]
  apply = ((tf.random.stateless_uniform([], seeds[2]) < prob) & tf.reduce_any(fits))

  def erase():
    top = tf.random.stateless_uniform([], seeds[3], 0, height - erase_h + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([], seeds[4], 0, width - erase_w + 1, dtype=tf.int32)
    noise = tf.random.stateless_normal([erase_h, erase_w, shape[2]], seeds[5], dtype=image.dtype)
    rows = image[top:top + erase_h]
    band = tf.concat([rows[:, :left], noise, rows[:, left + erase_w:]], axis=1)
    return tf.concat([image[:top], band, image[top + erase_h:]], axis=0)

  erased = tf.cond(apply, erase, lambda: image)
  erased.set_shape(image.shape)
  return erased
