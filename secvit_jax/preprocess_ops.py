"""TensorFlow image ops of the input pipeline: the release's (timm 0.9.10) training augmentations.

Layout: an image is HWC with 3 RGB channels; uint8 in [0, 255] up to `normalize`, float32 (ImageNet
normalized) after it. The ops are written for `tf.data` map functions (graph mode, any image size).

Randomness is stateless: every random op takes `seed`, a (2,) int32/int64 tensor as the
`tf.random.stateless_*` ops use, and its output is a function of its inputs and that seed alone
(the input pipeline derives one seed per example from the run's seed and the example's position,
which makes the batches reproducible and cheap to resume).

Importing this module hides every GPU and TPU from TensorFlow: preprocessing runs on the host CPU
and must never take accelerator memory from JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf


def _hide_accelerators_from_tf() -> None:
  for device_type in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], device_type)
    except RuntimeError:
      # TensorFlow initialized its devices before this import; it can no longer be changed here.
      if tf.config.get_visible_devices(device_type):
        raise RuntimeError(
            f'TensorFlow already uses a {device_type}: import secvit_jax.preprocess_ops (or '
            'secvit_jax.input_pipeline) before anything initializes TensorFlow') from None


_hide_accelerators_from_tf()

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm fills the geometric RandAugment ops with the mean colour, round(255 * mean) per channel.
FILL_COLOR = tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN)

Seed = tf.Tensor  # (2,) int32 or int64.


@functools.lru_cache(maxsize=32)
def _full_array(values: tuple[float, ...], shape: tuple[int, ...], dtype: str) -> np.ndarray:
  return np.broadcast_to(np.asarray(values, dtype), shape).copy()


def _per_channel(values: Sequence[float], shape: tf.TensorShape, dtype=tf.float32) -> tf.Tensor:
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
  scale = _per_channel([1.0 / (255.0 * std) for std in IMAGENET_STD], image.shape)
  offset = _per_channel([-mean / std for mean, std in zip(IMAGENET_MEAN, IMAGENET_STD)],
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


# ------------------------------------------------------------------------------------------------
# RandAugment (timm 0.9.10's `rand_augment_transform`), on uint8 images.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RandAugmentParams:
  """A parsed timm RandAugment spec such as 'rand-m9-mstd0.5-inc1'.

  Attributes:
    num_layers: ops applied per image ('n', default 2), each drawn uniformly with replacement.
    magnitude: mean magnitude out of 10 ('m', default 10).
    magnitude_std: std of the per-op magnitude ('mstd', default 0); > 100 means uniform in
      [0, magnitude].
    magnitude_max: magnitudes are clipped to [0, magnitude_max] ('mmax', default 10).
    prob: probability of applying each drawn op ('p', default 0.5).
    increasing: the "increasing" op forms, where a larger magnitude is always a stronger change
      ('inc1'; default off).
  """
  num_layers: int = 2
  magnitude: float = 10.0
  magnitude_std: float = 0.0
  magnitude_max: float = 10.0
  prob: float = 0.5
  increasing: bool = False


def parse_randaugment(spec: str) -> RandAugmentParams:
  """Parses a timm RandAugment spec: 'rand' then '-'-separated m, n, mstd, mmax, p, inc sections.

  Raises:
    ValueError: naming the spec and the section it does not understand.
  """
  sections = spec.split('-')
  if sections[0] != 'rand':
    raise ValueError(f"RandAugment spec {spec!r} must start with 'rand-'")
  fields = {}
  for section in sections[1:]:
    match = re.fullmatch(r'([a-z]+)(\d+(?:\.\d*)?)', section)
    if not match:
      raise ValueError(f'RandAugment spec {spec!r}: cannot parse section {section!r}')
    key, value = match.groups()
    if key == 'm':
      fields['magnitude'] = float(value)
    elif key == 'n':
      fields['num_layers'] = int(float(value))
    elif key == 'mstd':
      fields['magnitude_std'] = math.inf if float(value) > 100 else float(value)
    elif key == 'mmax':
      fields['magnitude_max'] = float(value)
    elif key == 'p':
      fields['prob'] = float(value)
    elif key == 'inc':
      fields['increasing'] = bool(int(float(value)))
    else:
      raise ValueError(f'RandAugment spec {spec!r}: unknown section {section!r} (known: m, n, '
                       'mstd, mmax, p, inc)')
  return RandAugmentParams(**fields)


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  """float -> uint8, clipped to [0, 255] and truncated, as PIL's blend and point ops do."""
  return tf.cast(tf.clip_by_value(image, 0.0, 255.0), tf.uint8)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL's `Image.blend(degenerate, image, factor)` on uint8 images (ImageEnhance's core)."""
  degenerate = tf.cast(degenerate, tf.float32)
  return _to_uint8(degenerate + factor * (tf.cast(image, tf.float32) - degenerate))


def _grayscale(image: tf.Tensor, channels: int) -> tf.Tensor:
  """PIL's RGB -> L conversion, (19595 R + 38470 G + 7471 B + 2^15) >> 16, as float32 (H, W,
  channels) with `channels` equal channels.

  A matrix product of the integer weights (exact in float32: the sums stay below 2^24), which is
  much faster on CPU than weighting the channels by broadcasting.
  """
  weights = tf.constant([[19595.0], [38470.0], [7471.0]]) * tf.ones([1, channels])
  flat = tf.reshape(tf.cast(image, tf.float32), [-1, 3])
  gray = tf.floor((tf.matmul(flat, weights) + 32768.0) / 65536.0)
  return tf.reshape(gray, tf.concat([tf.shape(image)[:2], [channels]], axis=0))


def _lookup(image: tf.Tensor, table: tf.Tensor) -> tf.Tensor:
  """Maps uint8 (H, W, 3) through `table`: (256,) for all channels or (3, 256) per channel."""
  index = tf.cast(image, tf.int32)
  if table.shape.rank == 2:
    index += _per_channel([0, 256, 512], image.shape, tf.int32)
    table = tf.reshape(table, [-1])
  return tf.gather(tf.cast(table, tf.uint8), index)


def _histograms(image: tf.Tensor) -> tf.Tensor:
  """Per-channel histograms of uint8 (H, W, 3): int32 (3, 256)."""
  index = tf.cast(image, tf.int32) + _per_channel([0, 256, 512], image.shape, tf.int32)
  counts = tf.math.bincount(tf.reshape(index, [-1]), minlength=768, maxlength=768)
  return tf.reshape(counts, [3, 256])


_LEVELS = tf.range(256, dtype=tf.int32)


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
  """PIL's `ImageOps.autocontrast`: stretches each channel's [min, max] to [0, 255]."""
  low = tf.cast(tf.reduce_min(image, axis=[0, 1]), tf.float32)[:, None]
  high = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.float32)[:, None]
  levels = tf.cast(_LEVELS, tf.float32)[None, :]
  stretched = tf.clip_by_value((levels - low) * (255.0 / tf.maximum(high - low, 1.0)), 0.0, 255.0)
  table = tf.where(high > low, tf.floor(stretched), levels)
  return _lookup(image, table)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """PIL's `ImageOps.equalize`: per-channel histogram equalization."""
  histograms = _histograms(image)
  # The count of each channel's last non-empty bin.
  last_index = 255 - tf.argmax(tf.cast(tf.reverse(histograms, [1]) > 0, tf.int32), axis=1,
                               output_type=tf.int32)
  last_count = tf.gather(histograms, last_index, batch_dims=1)
  step = (tf.reduce_sum(histograms, axis=1) - last_count) // 255
  cumulative = tf.cumsum(histograms, axis=1, exclusive=True)
  safe_step = tf.maximum(step, 1)[:, None]
  table = tf.minimum((safe_step // 2 + cumulative) // safe_step, 255)
  # step is 0 when a channel has a single value (or nearly): PIL leaves it unchanged.
  table = tf.where(step[:, None] > 0, table, _LEVELS[None, :])
  return _lookup(image, table)


def invert(image: tf.Tensor) -> tf.Tensor:
  return 255 - image


def posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
  """Keeps the `bits` (int32 scalar in [0, 8]) most significant bits of every value."""
  mask = 255 - (tf.bitwise.left_shift(tf.constant(1), 8 - bits) - 1)
  return _lookup(image, tf.bitwise.bitwise_and(_LEVELS, mask))


def solarize(image: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
  """Inverts values >= threshold (int32 scalar)."""
  return _lookup(image, tf.where(_LEVELS >= threshold, 255 - _LEVELS, _LEVELS))


def solarize_add(image: tf.Tensor, addition: tf.Tensor, threshold: int = 128) -> tf.Tensor:
  """Adds `addition` (int32 scalar) to values below `threshold`, saturating at 255."""
  return _lookup(image, tf.where(_LEVELS < threshold, tf.minimum(_LEVELS + addition, 255),
                                 _LEVELS))


def color(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL's `ImageEnhance.Color`: blends with the grayscale image (factor 0: gray, 1: unchanged)."""
  return _blend(_grayscale(image, 3), image, factor)


def contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL's `ImageEnhance.Contrast`: blends with the image's mean gray level."""
  return _blend(tf.floor(tf.reduce_mean(_grayscale(image, 1)) + 0.5), image, factor)


def brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL's `ImageEnhance.Brightness`: blends with black."""
  return _blend(0.0, image, factor)


def sharpness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL's `ImageEnhance.Sharpness`: blends with the image smoothed by PIL's SMOOTH 3×3 filter
  ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13), whose one-pixel border is the original image."""
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(tf.cast(image, tf.float32)[None], kernel, [1, 1, 1, 1],
                                  'VALID')[0]
  smooth = tf.round(tf.clip_by_value(smooth, 0.0, 255.0))
  interior = _blend(smooth, image[1:-1, 1:-1], factor)
  middle = tf.concat([image[1:-1, :1], interior, image[1:-1, -1:]], axis=1)
  sharpened = tf.concat([image[:1], middle, image[-1:]], axis=0)
  sharpened.set_shape(image.shape)
  return sharpened


def affine_transform(image: tf.Tensor, matrix: Sequence[tf.Tensor],
                     fill: Sequence[int] = FILL_COLOR) -> tf.Tensor:
  """PIL's `Image.transform(size, AFFINE, matrix, fillcolor=fill)` on uint8 (H, W, 3).

  `matrix` = (a, b, c, d, e, f) maps each output pixel (x, y) to the input point
  (a x + b y + c, d x + e y + f) (pixel index coordinates), sampled bilinearly; points outside the
  image take the colour `fill`. (timm resamples these ops bicubically; TensorFlow's transform op
  has no bicubic mode.)
  """
  fill = _per_channel(fill, image.shape)
  transform = tf.cast(tf.stack(list(matrix) + [0.0, 0.0])[None], tf.float32)
  shifted = tf.cast(image, tf.float32)[None] - fill
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=shifted, transforms=transform, output_shape=tf.shape(image)[:2], fill_value=0.0,
      interpolation='BILINEAR', fill_mode='CONSTANT')[0]
  out = tf.cast(tf.round(tf.clip_by_value(out + fill, 0.0, 255.0)), tf.uint8)
  out.set_shape(image.shape)
  return out


def rotate(image: tf.Tensor, degrees: tf.Tensor) -> tf.Tensor:
  """Rotates counter-clockwise by `degrees` about the image centre (PIL's `Image.rotate`)."""
  shape = tf.shape(image)
  center_y = (tf.cast(shape[0], tf.float32) - 1.0) / 2.0
  center_x = (tf.cast(shape[1], tf.float32) - 1.0) / 2.0
  radians = degrees * (math.pi / 180.0)
  cos, sin = tf.cos(radians), tf.sin(radians)
  return affine_transform(image, [
      cos, -sin, center_x - cos * center_x + sin * center_y,
      sin, cos, center_y - sin * center_x - cos * center_y])


def shear_x(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  return affine_transform(image, [1.0, factor, 0.0, 0.0, 1.0, 0.0])


def shear_y(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  return affine_transform(image, [1.0, 0.0, 0.0, factor, 1.0, 0.0])


def translate_x(image: tf.Tensor, pixels: tf.Tensor) -> tf.Tensor:
  """Shifts the content left by `pixels` (right when negative)."""
  return affine_transform(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0])


def translate_y(image: tf.Tensor, pixels: tf.Tensor) -> tf.Tensor:
  """Shifts the content up by `pixels` (down when negative)."""
  return affine_transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels])


def _randaugment_ops(image: tf.Tensor, magnitude: tf.Tensor, sign: tf.Tensor, increasing: bool,
                     translate_pct: float) -> list[Callable[[], tf.Tensor]]:
  """The 15 RandAugment ops of timm's `_RAND_TRANSFORMS` / `_RAND_INCREASING_TRANSFORMS`.

  Each is a thunk for `tf.switch_case`, with timm's magnitude-to-argument mapping: `magnitude` is a
  float32 scalar in [0, 10], `sign` ±1.0 (timm's `_randomly_negate`).
  """
  level = magnitude / 10.0
  if increasing:
    bits = 4 - tf.cast(level * 4, tf.int32)
    threshold = 256 - tf.cast(level * 256, tf.int32)
    factor = 1.0 + sign * level * 0.9
  else:
    bits = tf.cast(level * 4, tf.int32)
    threshold = tf.cast(level * 256, tf.int32)
    factor = level * 1.8 + 0.1
  shape = tf.cast(tf.shape(image), tf.float32)
  return [
      lambda: auto_contrast(image),
      lambda: equalize(image),
      lambda: invert(image),
      lambda: rotate(image, sign * level * 30.0),
      lambda: posterize(image, bits),
      lambda: solarize(image, threshold),
      lambda: solarize_add(image, tf.cast(level * 110, tf.int32)),
      lambda: color(image, factor),
      lambda: contrast(image, factor),
      lambda: brightness(image, factor),
      lambda: sharpness(image, factor),
      lambda: shear_x(image, sign * level * 0.3),
      lambda: shear_y(image, sign * level * 0.3),
      lambda: translate_x(image, sign * level * translate_pct * shape[1]),
      lambda: translate_y(image, sign * level * translate_pct * shape[0]),
  ]


NUM_RANDAUGMENT_OPS = 15


def rand_augment(image: tf.Tensor, seed: Seed, params: RandAugmentParams,
                 translate_pct: float = 0.45) -> tf.Tensor:
  """timm's RandAugment on a uint8 (H, W, 3) image.

  For each of `params.num_layers` layers: one op drawn uniformly from the 15, applied with
  probability `params.prob`, at a magnitude drawn from N(magnitude, magnitude_std) clipped to
  [0, magnitude_max]. Geometric ops fill with `FILL_COLOR`; translations go up to `translate_pct`
  of the image size.
  """
  for layer in range(params.num_layers):
    seeds = tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(seed, layer), 4)
    op = tf.random.stateless_uniform([], seeds[0], 0, NUM_RANDAUGMENT_OPS, dtype=tf.int32)
    apply = tf.random.stateless_uniform([], seeds[1]) < params.prob
    if params.magnitude_std == math.inf:
      magnitude = tf.random.stateless_uniform([], seeds[2], 0.0, params.magnitude)
    else:
      magnitude = params.magnitude + params.magnitude_std * tf.random.stateless_normal(
          [], seeds[2])
    magnitude = tf.clip_by_value(magnitude, 0.0, params.magnitude_max)
    sign = tf.where(tf.random.stateless_uniform([], seeds[3]) < 0.5, 1.0, -1.0)
    branches = _randaugment_ops(image, magnitude, sign, params.increasing, translate_pct)
    augmented = tf.cond(apply, lambda b=branches, o=op: tf.switch_case(o, b), lambda i=image: i)
    augmented.set_shape(image.shape)
    image = augmented
  return image
