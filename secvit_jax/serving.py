"""What a served model computes besides the model: the geometry of its inputs and the in-graph
preprocessing of uint8 images (`secvit-export --with_preprocessing`).

Each task says what it serves (`tasks.base.Task.serving_outputs`, `serving_preprocess`,
`serving_size`); these are the pieces they share. Everything here is traced into the exported
graph: sizes may be symbolic dimensions (a dynamic batch, images of any size).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Outputs = dict[str, jax.Array]

# ImageNet's mean and standard deviation, as `data.ops` holds them (that module imports
# TensorFlow, which a served JAX function does not need).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Where each image of a batch lies on the model input (traced arrays).

  image_size: int32 (B, 2), the (height, width) of the image's region on the model input.
  original_size: int32 (B, 2), the (height, width) the outputs are reported at.
  """
  image_size: jax.Array
  original_size: jax.Array

  @classmethod
  def identity(cls, images: jax.Array) -> Geometry:
    """Images that fill the model input and are reported at its size."""
    size = jnp.broadcast_to(jnp.array(images.shape[1:3], jnp.int32), (images.shape[0], 2))
    return cls(size, size)


def normalize(images: jax.Array) -> jax.Array:
  """float (B, H, W, 3) pixel values in [0, 255] -> (x / 255 - mean) / std, as
  `data.ops.normalize` (its scale and offset computed in float64 and rounded once)."""
  mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
  return (images.astype(jnp.float32) * (1.0 / (255.0 * std)).astype(np.float32)
          + (-mean / std).astype(np.float32))


def image_size(pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The (height, width) of a batch of images as float32 scalars (symbolic sizes as values)."""
  return tuple(jnp.asarray(d, jnp.float32) for d in pixels.shape[1:3])


def resample(pixels: jax.Array, size: tuple[int, int], scale: jax.Array, translation: jax.Array,
             method: str) -> jax.Array:
  """float32 (B, *size, C) in [0, 255]: uint8 (B, h, w, C) images scaled by `scale` (2,) about
  the origin and shifted by `translation` (2,) (`jax.image.scale_and_translate`, antialiased
  when shrinking), clipped to the pixel range."""
  resampled = jax.image.scale_and_translate(
      pixels.astype(jnp.float32), (pixels.shape[0], *size, pixels.shape[3]), (1, 2), scale,
      translation, method=method, antialias=True, precision=jax.lax.Precision.HIGHEST)
  return jnp.clip(resampled, 0, 255)


def centre_crop(pixels: jax.Array, size: tuple[int, int]) -> tuple[jax.Array, Geometry]:
  """A classifier's evaluation geometry: uint8 images scaled (bicubic) to cover (H, W)·256/224,
  their central H×W (`data.classification.eval_crop` for H = W), normalized."""
  height, width = image_size(pixels)
  scale = jnp.maximum(size[0] / height, size[1] / width) * (256 / 224)
  translation = jnp.stack([(size[0] - scale * height) / 2, (size[1] - scale * width) / 2])
  inputs = normalize(resample(pixels, size, jnp.stack([scale, scale]), translation, 'cubic'))
  return inputs, Geometry.identity(inputs)


def stretch(pixels: jax.Array, size: tuple[int, int]) -> tuple[jax.Array, Geometry]:
  """uint8 images resized whole (bilinear) to (H, W), normalized."""
  height, width = image_size(pixels)
  scale = jnp.stack([size[0] / height, size[1] / width])
  inputs = normalize(resample(pixels, size, scale, jnp.zeros(2), 'linear'))
  return inputs, Geometry.identity(inputs)


def on_canvas(pixels: jax.Array, canvas: tuple[int, int],
              max_size: Any) -> tuple[jax.Array, Geometry]:
  """A detector's evaluation geometry (`data.detection.resized_size`): uint8 images scaled
  (bilinear) by min(long_max / long, short_max / short) with `max_size` = (long_max, short_max),
  and to fit the canvas, normalized, at the top-left of a zero canvas."""
  height, width = image_size(pixels)
  long_max, short_max = (float(x) for x in max_size)
  scale = jnp.minimum(long_max / jnp.maximum(height, width),
                      short_max / jnp.minimum(height, width))
  scale = jnp.minimum(scale, jnp.minimum(canvas[0] / height, canvas[1] / width))
  region = jnp.floor(jnp.stack([height, width]) * scale + 0.5).astype(jnp.int32)
  region = jnp.clip(region, 1, jnp.array(canvas, jnp.int32))
  inputs = normalize(resample(pixels, canvas, jnp.stack([scale, scale]), jnp.zeros(2), 'linear'))
  inside = ((jnp.arange(canvas[0])[:, None] < region[0])
            & (jnp.arange(canvas[1])[None, :] < region[1]))
  inputs = jnp.where(inside[None, :, :, None], inputs, 0.0)
  batch = pixels.shape[0]
  original = jnp.stack([height, width]).astype(jnp.int32)
  return inputs, Geometry(jnp.broadcast_to(region, (batch, 2)),
                          jnp.broadcast_to(original, (batch, 2)))
