"""Semantic segmentation heads as mmsegmentation builds them (NHWC), and the segmenter that puts a
backbone, an optional neck and the heads together.

  SemanticFPNHead  Kirillov et al. 2019, on the `fpn.FPN` neck's four maps (strides 4-32).
  UPerHead         Xiao et al. 2018: a pyramid pooling module on the stride-32 map and an FPN of
                   its own with BatchNorm, fused at stride 4.
  FCNHead          the auxiliary head of UperNet: one 3×3 conv block on the stride-16 map.

Every head ends as mmseg's: channel dropout (`nn.Dropout2d`: whole maps) and a 1×1 classifier;
its logits are at the stride of its finest input (4). Convolutions followed by BatchNorm have no
bias (mmseg's `ConvModule`); BatchNorm is the backbone's (eps 1e-5, PyTorch momentum 0.1) and,
under a batch-sharded `jit`, normalizes with the statistics of the global batch (SyncBN).
Upsampling is bilinear with `align_corners=False` (`resize_bilinear`).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# JAX's resize, bound at import: an ONNX export (jax2onnx 0.12.5) replaces the attribute
# `jax.image.resize` while it converts with an operation of static shapes, which cannot take a
# dynamic batch; bound here, the resize is converted as the operations it is made of.
_jax_resize = jax.image.resize
import numpy as np

from secvit_jax import model as model_lib
from secvit_jax.heads import fpn

Dtype = jnp.dtype

# mmcv's ConvModule initializes its conv with kaiming_normal_(mode='fan_out', relu); mmseg's
# classifier (`conv_seg`) with normal(std=0.01) and a zero bias.
conv_block_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
classifier_init = nn.initializers.normal(stddev=0.01)


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
  """PyTorch's `F.interpolate(x, (height, width), mode='bilinear', align_corners=False)` on NHWC.

  Output pixel i samples input coordinate (i + 0.5) · H_in / height - 0.5, clamped to the image,
  without antialiasing (what `jax.image.resize` does with antialias=False, shrinking included).
  """
  if x.shape[1:3] == (height, width):
    return x
  return _jax_resize(x, (x.shape[0], height, width, x.shape[3]), 'bilinear', antialias=False)


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
  """PyTorch's `AdaptiveAvgPool2d(size)` on NHWC: (B, H, W, C) -> (B, size, size, C), bin i of
  an axis of length n averaging [floor(i·n / size), ceil((i + 1)·n / size)); float32 sums."""
  def bins(n):
    matrix = np.zeros((size, n), np.float32)
    for i in range(size):
      start, end = (i * n) // size, -(-(i + 1) * n // size)
      matrix[i, start:end] = 1.0 / (end - start)
    return matrix

  pooled = jnp.einsum('ih,bhwc,jw->bijc', bins(x.shape[1]), x.astype(jnp.float32),
                      bins(x.shape[2]), precision=jax.lax.Precision.HIGHEST)
  return pooled.astype(x.dtype)


class ConvBlock(nn.Module):
  """mmcv's ConvModule with BN and ReLU: conv (no bias, padding k // 2) · BatchNorm · ReLU."""
  features: int
  kernel_size: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    pad = self.kernel_size // 2
    x = nn.Conv(self.features, (self.kernel_size, self.kernel_size),
                padding=((pad, pad), (pad, pad)), use_bias=False, dtype=self.dtype,
                kernel_init=conv_block_init, name='conv')(x)
    return nn.relu(model_lib.batch_norm(train, self.dtype, 'bn')(x))


class Classifier(nn.Module):
  """mmseg's `cls_seg`: channel dropout (`Dropout2d`), then a 1×1 conv to float32 logits."""
  num_classes: int
  dropout: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)(x)
    x = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, kernel_init=classifier_init,
                name='conv_seg')(x)
    return x.astype(jnp.float32)


class SemanticFPNHead(nn.Module):
  """Semantic FPN's head (mmseg `FPNHead`) on FPN maps at strides 4, 8, 16, 32, ...

  Level i runs max(1, log2(stride_i / 4)) conv blocks of `channels`, each but those of the finest
  level followed by a 2× bilinear upsample; the levels are resized to the finest and summed, then
  classified. `__call__(maps, train)`: a sequence of (B, H_i, W_i, C) -> (B, H_0, W_0, classes)
  float32.
  """
  num_classes: int
  channels: int = 128
  dropout: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, maps: Sequence[jax.Array], train: bool) -> jax.Array:
    output = None
    for level, x in enumerate(maps):
      for block in range(max(1, level)):  # log2(stride / 4) = level.
        x = ConvBlock(self.channels, 3, self.dtype, name=f'scale_head_{level}_{block}')(x, train)
        if level:
          x = resize_bilinear(x, 2 * x.shape[1], 2 * x.shape[2])
      if output is None:
        output = x
      else:
        output = output + resize_bilinear(x, output.shape[1], output.shape[2])
    return Classifier(self.num_classes, self.dropout, self.dtype, name='cls')(output, train)


class PyramidPooling(nn.Module):
  """UperNet's PPM: per scale s, adaptive average pooling to s×s, a 1×1 conv block, bilinear
  upsampling back; concatenated with the input, fused by a 3×3 conv block. (B, H, W, C) ->
  (B, H, W, channels)."""
  channels: int
  pool_scales: Sequence[int] = (1, 2, 3, 6)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    branches = [x]
    for index, scale in enumerate(self.pool_scales):
      pooled = ConvBlock(self.channels, 1, self.dtype, name=f'pool_{index}')(
          adaptive_avg_pool(x, scale), train)
      branches.append(resize_bilinear(pooled, x.shape[1], x.shape[2]).astype(x.dtype))
    fused = jnp.concatenate([b.astype(self.dtype) for b in branches], axis=-1)
    return ConvBlock(self.channels, 3, self.dtype, name='bottleneck')(fused, train)


class UPerHead(nn.Module):
  """UperNet's decode head (mmseg `UPerHead`) on backbone maps at strides 4, 8, 16, 32.

  The coarsest map goes through `PyramidPooling`; the others through 1×1 lateral conv blocks; a
  top-down path adds each coarser level, bilinearly upsampled, to the finer one; every level but
  the pooled one gets a 3×3 conv block; all are upsampled to stride 4, concatenated, fused by a
  3×3 conv block and classified. `__call__(maps, train)` -> (B, H_0, W_0, classes) float32.
  """
  num_classes: int
  channels: int = 512
  pool_scales: Sequence[int] = (1, 2, 3, 6)
  dropout: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, maps: Sequence[jax.Array], train: bool) -> jax.Array:
    laterals = [ConvBlock(self.channels, 1, self.dtype, name=f'lateral_{i}')(x, train)
                for i, x in enumerate(maps[:-1])]
    laterals.append(PyramidPooling(self.channels, tuple(self.pool_scales), self.dtype,
                                   name='psp')(maps[-1], train))
    for i in range(len(laterals) - 1, 0, -1):
      finer = laterals[i - 1]
      laterals[i - 1] = finer + resize_bilinear(laterals[i], finer.shape[1], finer.shape[2])
    outputs = [ConvBlock(self.channels, 3, self.dtype, name=f'fpn_{i}')(x, train)
               for i, x in enumerate(laterals[:-1])] + [laterals[-1]]
    height, width = outputs[0].shape[1:3]
    fused = jnp.concatenate([resize_bilinear(x, height, width) for x in outputs], axis=-1)
    fused = ConvBlock(self.channels, 3, self.dtype, name='fpn_bottleneck')(fused, train)
    return Classifier(self.num_classes, self.dropout, self.dtype, name='cls')(fused, train)


class FCNHead(nn.Module):
  """mmseg's `FCNHead` as UperNet's auxiliary head: `num_convs` 3×3 conv blocks on one backbone
  map (`in_index`), no concatenation of the input, then the classifier. `__call__(maps, train)`
  -> (B, H_i, W_i, classes) float32 at that map's stride."""
  num_classes: int
  channels: int = 256
  num_convs: int = 1
  in_index: int = 2
  dropout: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, maps: Sequence[jax.Array], train: bool) -> jax.Array:
    x = maps[self.in_index]
    for index in range(self.num_convs):
      x = ConvBlock(self.channels, 3, self.dtype, name=f'conv_{index}')(x, train)
    return Classifier(self.num_classes, self.dropout, self.dtype, name='cls')(x, train)


class Segmenter(nn.Module):
  """A backbone, an optional neck, a decode head and an optional auxiliary head (mmseg's
  `EncoderDecoder`).

  `__call__(images, train=False)`: (B, H, W, 3) normalized NHWC -> {'logits': (B, h, w, classes)
  float32 at the decode head's stride (4: h = ceil(H / 4))} and, in training (and at init),
  'aux_logits' of the auxiliary head at its own stride. The auxiliary head reads the backbone's
  maps, the decode head the neck's (the backbone's without a neck).

  Attributes (submodules, whose names are their parameters' top-level keys):
    backbone: images, train -> a tuple of maps (e.g. `model.create_backbone(...)`).
    decode_head: maps, train -> logits.
    neck: maps -> maps, or None.
    auxiliary_head: maps, train -> logits, or None.
  """
  backbone: nn.Module
  decode_head: nn.Module
  neck: nn.Module | None = None
  auxiliary_head: nn.Module | None = None

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    maps = self.backbone(images, train)
    features = self.neck(maps) if self.neck is not None else maps
    outputs = {'logits': self.decode_head(features, train)}
    if self.auxiliary_head is not None and (train or self.is_initializing()):
      outputs['aux_logits'] = self.auxiliary_head(maps, train)
    return outputs


HEADS = ('semantic_fpn', 'upernet')


def create_segmenter(backbone: nn.Module, *, head: str, num_classes: int,
                     dtype: Dtype = jnp.float32, channels: int | None = None,
                     neck_channels: int = 256, pool_scales: Sequence[int] = (1, 2, 3, 6),
                     dropout: float = 0.1, auxiliary: bool | None = None,
                     auxiliary_channels: int = 256, auxiliary_in_index: int = 2) -> Segmenter:
  """A segmenter of `head` on `backbone` (whose maps are at strides 4, 8, 16, 32).

  Args:
    backbone: the backbone module (its output channels are read by the heads' convs).
    head: 'semantic_fpn' (FPN neck of `neck_channels` + `SemanticFPNHead`) or 'upernet'
      (`UPerHead` + an auxiliary `FCNHead`).
    num_classes: classes of every classifier.
    dtype: compute dtype of the neck and heads (logits are float32).
    channels: the decode head's channels; None: the recipe's (128 Semantic FPN, 512 UperNet).
    neck_channels: the FPN neck's channels (Semantic FPN).
    pool_scales: UperNet's pyramid pooling sizes.
    dropout: the classifiers' channel dropout rate.
    auxiliary: add the auxiliary FCN head; None: the recipe's (UperNet yes, Semantic FPN no).
    auxiliary_channels, auxiliary_in_index: its channels and the backbone map it reads.
  """
  if head not in HEADS:
    raise ValueError(f"unknown segmentation head {head!r}; choose one of {', '.join(HEADS)}")
  neck = None
  if head == 'semantic_fpn':
    neck = fpn.FPN(features=neck_channels, num_outputs=4, dtype=dtype)
    decode_head = SemanticFPNHead(num_classes, channels or 128, dropout, dtype)
  else:
    decode_head = UPerHead(num_classes, channels or 512, tuple(pool_scales), dropout, dtype)
  if auxiliary is None:
    auxiliary = head == 'upernet'
  auxiliary_head = FCNHead(num_classes, auxiliary_channels, 1, auxiliary_in_index, dropout,
                           dtype) if auxiliary else None
  return Segmenter(backbone=backbone, decode_head=decode_head, neck=neck,
                   auxiliary_head=auxiliary_head)

