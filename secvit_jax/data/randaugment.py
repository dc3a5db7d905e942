"""RandAugment as the release trains with it: timm 0.9.10's `rand_augment_transform`, in TensorFlow.

The ops work on uint8 (H, W, 3) RGB images in `tf.data` map functions and reproduce PIL's (timm
applies them to PIL images): point ops through lookup tables, ImageEnhance blends, affine
transforms filled with the mean colour. Randomness is stateless (see `ops`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Sequence

import tensorflow as tf

from secvit_jax.data import ops

# timm fills the geometric RandAugment ops with the mean colour, round(255 * mean) per channel.
FILL_COLOR = tuple(min(255, round(255 * m)) for m in ops.IMAGENET_MEAN)
Seed = ops.Seed


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
    index += ops.per_channel([0, 256, 512], image.shape, tf.int32)
    table = tf.reshape(table, [-1])
  return tf.gather(tf.cast(table, tf.uint8), index)


def _histograms(image: tf.Tensor) -> tf.Tensor:
  """Per-channel histograms of uint8 (H, W, 3): int32 (3, 256)."""
  index = tf.cast(image, tf.int32) + ops.per_channel([0, 256, 512], image.shape, tf.int32)
  counts = tf.math.bincount(tf.reshape(index, [-1]), minlength=768, maxlength=768)
  return tf.reshape(counts, [3, 256])


def _levels() -> tf.Tensor:
  """The 256 uint8 levels as int32 (0..255), the domain of the lookup tables."""
  return tf.range(256, dtype=tf.int32)


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
  """PIL's `ImageOps.autocontrast`: stretches each channel's [min, max] to [0, 255]."""
  low = tf.cast(tf.reduce_min(image, axis=[0, 1]), tf.float32)[:, None]
  high = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.float32)[:, None]
  levels = tf.cast(_levels(), tf.float32)[None, :]
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
  table = tf.where(step[:, None] > 0, table, _levels()[None, :])
  return _lookup(image, table)


def invert(image: tf.Tensor) -> tf.Tensor:
  return 255 - image


def posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
  """Keeps the `bits` (int32 scalar in [0, 8]) most significant bits of every value."""
  mask = 255 - (tf.bitwise.left_shift(tf.constant(1), 8 - bits) - 1)
  return _lookup(image, tf.bitwise.bitwise_and(_levels(), mask))


def solarize(image: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
  """Inverts values >= threshold (int32 scalar)."""
  return _lookup(image, tf.where(_levels() >= threshold, 255 - _levels(), _levels()))


def solarize_add(image: tf.Tensor, addition: tf.Tensor, threshold: int = 128) -> tf.Tensor:
  """Adds `addition` (int32 scalar) to values below `threshold`, saturating at 255."""
  return _lookup(image, tf.where(_levels() < threshold, tf.minimum(_levels() + addition, 255),
                                 _levels()))


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
  fill = ops.per_channel(fill, image.shape)
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
