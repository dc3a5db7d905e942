"""The feature pyramid network neck (Lin et al. 2017) as mmdet / mmseg build it, NHWC.

Semantic FPN uses it on a backbone's four maps (strides 4-32); RetinaNet from stride 8, with two
extra stride-2 levels (strides 8-128); the two-stage detectors on all four plus one.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype

# mmdet's / mmseg's FPN initializes its convolutions with Xavier (uniform) and zero biases.
conv_init = nn.initializers.xavier_uniform()


def resize_nearest(x: jax.Array, height: int, width: int) -> jax.Array:
  """PyTorch's `F.interpolate(x, size, mode='nearest')` on NHWC: output pixel (i, j) takes input
  pixel (floor(i · H_in / height), floor(j · W_in / width)). (`jax.image.resize` samples pixel
  centres instead, which picks other pixels where the sizes are not multiples.)"""
  rows = jnp.arange(height) * x.shape[1] // height
  cols = jnp.arange(width) * x.shape[2] // width
  return x[:, rows][:, :, cols]


class FPN(nn.Module):
  """Lateral 1×1 convs, a nearest-upsampled top-down path, a 3×3 conv per level; biases, no norm.

  Attributes:
    features: channels of every output (256 in the recipes).
    num_outputs: maps returned; those beyond the inputs used are extra levels.
    start_level: the first input used (1: from stride 8, as RetinaNet).
    extra_convs_on_input: extra levels are 3×3 stride-2 convs, the first on the last input map
      (mmdet's add_extra_convs='on_input'), each next one on the previous level; False: a
      stride-2 subsampling of the last output (mmdet's max-pool of kernel 1).
    dtype: the compute dtype.

  __call__(maps) with maps a sequence of (B, H_i, W_i, C_i), strides doubling, returns a tuple of
  `num_outputs` (B, H_j, W_j, features) maps, strides doubling from that of `maps[start_level]`.
  """
  features: int = 256
  num_outputs: int = 4
  start_level: int = 0
  extra_convs_on_input: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, maps: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    inputs = list(maps[self.start_level:])
    laterals = [nn.Conv(self.features, (1, 1), dtype=self.dtype, kernel_init=conv_init,
                        name=f'lateral_{i}')(x) for i, x in enumerate(inputs)]
    for i in range(len(laterals) - 1, 0, -1):
      finer = laterals[i - 1]
      laterals[i - 1] = finer + resize_nearest(laterals[i], finer.shape[1], finer.shape[2])
    outputs = [nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                       kernel_init=conv_init, name=f'output_{i}')(x)
               for i, x in enumerate(laterals)]
    source = inputs[-1]
    for i in range(self.num_outputs - len(outputs)):
      if self.extra_convs_on_input:
        outputs.append(nn.Conv(self.features, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                               dtype=self.dtype, kernel_init=conv_init, name=f'extra_{i}')(source))
        source = outputs[-1]
      else:
        outputs.append(outputs[-1][:, ::2, ::2])
    return tuple(outputs)
