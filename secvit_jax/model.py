"""SecViT (arXiv 2405.13337) in Flax linen: modules, the four released variants, `create_model`,
and the backbone for dense prediction, `create_backbone`.

Layout: images and feature maps are NHWC; token sequences flatten a feature map row-major (token
`r * W + c` is row r, column c), as the release does. Parameters are float32; `dtype` sets the
compute dtype (e.g. bfloat16). 1×1 convolutions are `Dense` layers on the channel axis.

Parameter tree (release state-dict names in brackets, see `convert.py` for the mapping):
  stem/conv_{0..3}, stem/bn_{0..3}                  [patch_embed.proj.{0,1,3,4,6,7,9,10}]
  stage_{i}/block_{j}/pos                           [layers.i.blocks.j.pos]
                     /norm1, norm2                  [...norm1.norm, ...norm2.norm]
                     /attn/{qkv, lepe, out_proj}    [...attn.*]
                     /ffn/{fc1, dwconv, fc2}        [...ffn.*]
                     /gamma_1, gamma_2  (C,)        [...gamma_{1,2}], only with layer scale
  stage_{i}/downsample/{reduction, norm}            [layers.i.downsample.*], i < 3
  proj, norm, head                                  [proj, norm, head]
The backbone holds stem/ and stage_{i}/ alike (no downsample after its last stage) and its own
out_norm_{i} LayerNorms; `load_classifier_into_backbone` fills it from a classifier's variables.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Mapping, Sequence

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from secvit_jax import cpu_kernels
from secvit_jax import sec

Dtype = Any

# The release initializes every conv weight with a truncated normal of std 0.02, biases with 0.
conv_init = nn.initializers.truncated_normal(stddev=0.02)


# ------------------------------------------------------------------------------------------------
# Building blocks.
# ------------------------------------------------------------------------------------------------


def depthwise_conv(x: jax.Array, kernel: jax.Array, impl: str = 'auto') -> jax.Array:
  """Depthwise k×k convolution (k odd), stride 1, 'same' zero padding, no bias.

  Args:
    x: (B, H, W, C).
    kernel: (k, k, 1, C), the layout of a Flax conv kernel with `feature_group_count=C`.
    impl: 'native' runs the C++ kernels of `cpu_kernels` (XLA FFI custom calls, CPU only, one
      device: XLA cannot partition them over a mesh); 'shift' sums k² shifted slices of the padded
      input, each scaled per channel, in XLA; both compute in float32 with the same hand-written
      backward pass. 'xla' is `lax.conv_general_dilated` with `feature_group_count=C`. 'auto' (the
      default) is 'native' on a single CPU device where the kernels build, 'shift' on other CPU
      setups and 'xla' on TPUs and GPUs, where convolutions are native. All give the same result
      up to float rounding. Measured on the 2-core CPU at secvit_s's shapes
      (benchmarks/depthwise.py): 'shift' is 20-60× faster than 'xla' forward and 5-40× forward
      plus backward; 'native' is 1.5-8× faster than 'shift' forward plus backward.

  Returns:
    (B, H, W, C) in x's dtype.
  """
  if impl == 'auto':
    if jax.default_backend() != 'cpu':
      impl = 'xla'
    else:
      impl = 'native' if cpu_kernels.use_native() else 'shift'
  if impl == 'xla':
    pad = kernel.shape[0] // 2
    return jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), window_strides=(1, 1), padding=((pad, pad), (pad, pad)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=x.shape[-1])
  if impl == 'shift':
    return _shifted_depthwise_conv(x, kernel)
  if impl == 'native':
    return _native_depthwise_conv(x, kernel)
  raise ValueError(f"depthwise conv impl must be 'auto', 'native', 'shift' or 'xla', got {impl!r}")


def _shifted_sum(x: jax.Array, taps: jax.Array) -> jax.Array:
  """sum_ij pad(x)[:, i:i+H, j:j+W] * taps[i, j]: (B, H, W, C), (k, k, C) -> (B, H, W, C) float32.

  XLA fuses the k² slices, products and sums into one loop over the output.
  """
  size = taps.shape[0]
  pad = size // 2
  height, width = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  taps = taps.astype(jnp.float32)
  out = None
  for i in range(size):
    for j in range(size):
      term = padded[:, i:i + height, j:j + width, :].astype(jnp.float32) * taps[i, j]
      out = term if out is None else out + term
  return out


def _shifted_kernel_grad(x: jax.Array, cotangent: jax.Array, size: int) -> jax.Array:
  """Per tap, the sum over (B, H, W) of shifted x × cotangent: -> (k, k, C) float32.

  XLA materializes each shifted slice of the padded input in a scalar loop: in the secvit_s train
  step (batch 8, 224², 2-core CPU) these took about 2 s of 5.5 s, hence `cpu_kernels`.
  """
  pad = size // 2
  height, width = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))).astype(jnp.float32)
  grad = cotangent.astype(jnp.float32)
  return jnp.stack([
      jnp.sum(padded[:, i:i + height, j:j + width] * grad, axis=(0, 1, 2))
      for i in range(size) for j in range(size)]).reshape(size, size, -1)


def _depthwise_conv_with_vjp(shifted_sum, kernel_grad):
  """A depthwise conv, (x (B, H, W, C), kernel (k, k, 1, C)) -> (B, H, W, C), from two ops.

  shifted_sum(x, taps (k, k, C)) computes the forward pass; the input gradient is the same op on
  the cotangent with the kernel flipped (autodiff would pad and add k² transposed slices instead);
  kernel_grad(x, cotangent, k) -> (k, k, C) gives the kernel gradient.
  """

  @jax.custom_vjp
  def conv(x, kernel):
    return shifted_sum(x, kernel[:, :, 0, :]).astype(x.dtype)

  def forward(x, kernel):
    return conv(x, kernel), (x, kernel)

  def backward(residuals, cotangent):
    x, kernel = residuals
    dx = shifted_sum(cotangent, kernel[::-1, ::-1, 0, :]).astype(x.dtype)
    dkernel = kernel_grad(x, cotangent, kernel.shape[0])
    return dx, dkernel.reshape(kernel.shape).astype(kernel.dtype)

  conv.defvjp(forward, backward)
  return conv


_shifted_depthwise_conv = _depthwise_conv_with_vjp(_shifted_sum, _shifted_kernel_grad)
_native_depthwise_conv = _depthwise_conv_with_vjp(cpu_kernels.shifted_sum,
                                                  cpu_kernels.kernel_grad)


class DepthwiseConv(nn.Module):
  """Depthwise k×k conv with bias (the release's `pos`, `lepe` and FFN `dwconv`). NHWC -> NHWC."""
  kernel_size: int
  dtype: Dtype = jnp.float32
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    kernel = self.param('kernel', conv_init, (self.kernel_size, self.kernel_size, 1, channels))
    bias = self.param('bias', nn.initializers.zeros, (channels,))
    x = x.astype(self.dtype)
    return depthwise_conv(x, kernel, self.impl) + bias.astype(self.dtype)


def batch_norm(train: bool, dtype: Dtype, name: str) -> nn.BatchNorm:
  """BatchNorm as the release's (eps 1e-5, PyTorch momentum 0.1). Under `jax.jit` with the batch
  sharded over devices the batch statistics are global, as the release's SyncBatchNorm."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      use_fast_variance=False, dtype=dtype, name=name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _native_layer_norm(x, scale, bias, epsilon):
  return cpu_kernels.layer_norm(x, scale, bias, epsilon)[0]


def _native_layer_norm_fwd(x, scale, bias, epsilon):
  y, mean, rstd = cpu_kernels.layer_norm(x, scale, bias, epsilon)
  return y, (x, scale, mean, rstd)


def _native_layer_norm_bwd(epsilon, residuals, cotangent):
  del epsilon
  x, scale, mean, rstd = residuals
  return cpu_kernels.layer_norm_grad(x, scale, mean, rstd, cotangent)


_native_layer_norm.defvjp(_native_layer_norm_fwd, _native_layer_norm_bwd)


class NativeLayerNorm(nn.Module):
  """`nn.LayerNorm(epsilon, use_fast_variance=False)` in float32 over the last axis, with the same
  parameters (`scale`, `bias` (C,)), its forward and backward passes the native kernels of
  `cpu_kernels` (each reads a row once while it is in cache): for a single CPU device, where
  `layer_norm` picks it. Equal to flax's within float rounding. (..., C) -> (..., C) float32.
  Where C is not a multiple of 16 it computes flax's formula in XLA. Forward and backward of
  stage 0's norm in secvit_t at batch 8 ((8, 56, 56, 64)): flax 2.86 ms, native 1.33; the train
  step 7.79 -> 8.04 img/s (benchmarks.throughput --baseline, one run).
  """
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (channels,))
    bias = self.param('bias', nn.initializers.zeros, (channels,))
    x = x.astype(jnp.float32)
    if channels % 16 == 0:
      return _native_layer_norm(x, scale, bias, self.epsilon)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * (jax.lax.rsqrt(variance + self.epsilon) * scale) + bias


def layer_norm(dtype: Dtype, name: str) -> nn.Module:
  """The release's LayerNorm (eps 1e-6): `NativeLayerNorm` in float32 on a single CPU device
  (`cpu_kernels.use_native`), flax's elsewhere; both hold `scale` and `bias` (C,)."""
  if jnp.dtype(dtype) == jnp.float32 and cpu_kernels.use_native():
    return NativeLayerNorm(epsilon=1e-6, name=name)
  return nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=dtype, name=name)


@jax.custom_vjp
def channel_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x @ kernel over the last axis: (..., C_in), (C_in, C_out) -> (..., C_out).

  The backward pass is written out so that the kernel gradient is one 2-D matmul of the
  flattened tokens, (N, C_in)ᵀ @ (N, C_out): autodiff of the N-D product copied the activations
  into a transposed layout for it, one copy per layer. -150 ms (-6%) on the secvit_s train step
  (batch 8, 224², float32, 2-core CPU; 2.63 -> 2.48 s, interleaved A/B in one process).
  """
  return x @ kernel


def _channel_matmul_fwd(x, kernel):
  return x @ kernel, (x, kernel)


def _channel_matmul_bwd(residuals, cotangent):
  x, kernel = residuals
  tokens = x.reshape(-1, x.shape[-1])
  return cotangent @ kernel.T, tokens.T @ cotangent.reshape(-1, cotangent.shape[-1])


channel_matmul.defvjp(_channel_matmul_fwd, _channel_matmul_bwd)


class Dense(nn.Module):
  """`nn.Dense` on the last axis (same parameters, `kernel` (C_in, C_out) and `bias`), through
  `channel_matmul`. (..., C_in) -> (..., C_out) in `dtype`."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', conv_init, (x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    return (channel_matmul(x.astype(self.dtype), kernel.astype(self.dtype))
            + bias.astype(self.dtype))


def dense(features: int, dtype: Dtype, name: str) -> Dense:
  return Dense(features, dtype=dtype, name=name)


# The stem's and the downsamples' convolutions whose kernel gradient `cpu_kernels` computes on a
# single CPU device: those of at most this many weights. Measured on the 2-core CPU at batch 8,
# 224² (kernel gradient, XLA against native): stem conv_1 (32 -> 32, 112²) 56.7 against 11.9 ms,
# conv_3 (32 -> 64) 27.7 against 7.4, stage 0's downsample (64 -> 128) 14.3 against 8.0; with
# more weights per output row the native kernel loses (128 -> 256: 5.7 against 11.3 ms).
NATIVE_CONV_KERNEL_GRAD_MAX_WEIGHTS = 3 * 3 * 64 * 128


def _conv3x3(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """3×3 convolution with (1, 1) padding, NHWC / HWIO, as `nn.Conv` computes it."""
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((1, 1), (1, 1)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv3x3_native_kernel_grad(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """`_conv3x3` whose kernel gradient is `cpu_kernels.conv_kernel_grad`; the forward pass and the
  input gradient are XLA's, as autodiff gives them."""
  return _conv3x3(x, kernel, stride)


def _conv3x3_fwd(x, kernel, stride):
  return _conv3x3(x, kernel, stride), (x, kernel)


def _conv3x3_bwd(stride, residuals, cotangent):
  x, kernel = residuals
  dx = jax.vjp(lambda x: _conv3x3(x, kernel, stride), x)[1](cotangent)[0]
  dkernel = cpu_kernels.conv_kernel_grad(x, cotangent, kernel.shape[0], stride)
  return dx, dkernel.astype(kernel.dtype)


_conv3x3_native_kernel_grad.defvjp(_conv3x3_fwd, _conv3x3_bwd)


class Conv3x3(nn.Module):
  """3×3 convolution with bias, padding (1, 1) (the release's: 'SAME' would pad a stride-2 conv of
  an even input as (0, 1)). (B, H, W, C_in) -> (B, ceil(H/s), ceil(W/s), features) in `dtype`.

  Parameters and forward pass are `nn.Conv`'s. On a single CPU device, where `cpu_kernels` runs,
  a conv of at most NATIVE_CONV_KERNEL_GRAD_MAX_WEIGHTS weights takes its kernel gradient from it.
  """
  features: int
  stride: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', conv_init, (3, 3, x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if (kernel.size <= NATIVE_CONV_KERNEL_GRAD_MAX_WEIGHTS and self.features % 32 == 0
        and cpu_kernels.use_native()):
      y = _conv3x3_native_kernel_grad(x, kernel, self.stride)
    else:
      y = _conv3x3(x, kernel, self.stride)
    return y + bias.astype(self.dtype)


def conv3x3(features: int, stride: int, dtype: Dtype, name: str) -> Conv3x3:
  return Conv3x3(features, stride, dtype=dtype, name=name)


def gelu(x: jax.Array) -> jax.Array:
  """The exact GELU as the release (PyTorch) computes it: x/2 · (1 + erf(x/√2)).

  `nn.gelu(approximate=False)` goes through erfc, whose XLA expansion (exp and branch selects)
  is slower on the CPU: 3.5 against 1.3 ms forward, 26 against 7 ms forward+backward on a
  (25088, 192) array (stage 0's FFN of secvit_s at batch 8). The two differ by ≤ 1e-6.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


def rope_tables(height: int, width: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
  """Sine and cosine tables of the release's 2-D rotary embedding.

  Returns:
    (sin, cos), each (height * width, head_dim) float32 in row-major token order. Token (r, c)
    has angles concat(r · a, c · a) with a = 1 / 10000 ** linspace(0, 1, head_dim // 4), each
    value repeated twice in place.
  """
  angle = rope_angle(head_dim)
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
  angles = np.concatenate([rows.reshape(-1, 1) * angle, cols.reshape(-1, 1) * angle], axis=-1)
  return np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)


def rope_angle(head_dim: int) -> np.ndarray:
  """The release's `RoPE.angle` buffer: (head_dim // 2,) float32.

  Computed in float64 and rounded once; the release's buffer, computed in float32 by torch, can
  differ from it by about 1 float32 ulp (5e-7 relative), which changes no output measurably.
  """
  if head_dim % 4:
    raise ValueError(f'rotary embedding needs a head dim divisible by 4, got {head_dim}')
  angle = 1.0 / (10000.0 ** np.linspace(0.0, 1.0, head_dim // 4))
  return np.repeat(angle, 2).astype(np.float32)


def drop_path(x: jax.Array, rate: float, module: nn.Module, train: bool) -> jax.Array:
  """Stochastic depth: zeroes whole samples of a residual branch with probability `rate`."""
  if not train or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng('dropout'), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0).astype(x.dtype)


# ------------------------------------------------------------------------------------------------
# SecViT modules.
# ------------------------------------------------------------------------------------------------


class SECAttention(nn.Module):
  """Multi-head attention inside semantic equitable clusters, with RoPE and LePE.

  (B, H, W, C) -> (B, H, W, C). `sin`/`cos` are the stage's (H·W, C/heads) RoPE tables.
  """
  num_heads: int
  num_clusters: int
  dtype: Dtype = jnp.float32
  dwconv_impl: str = 'auto'
  attention_impl: str = 'auto'  # Inside the clusters: 'auto', 'einsum' or 'cudnn' (sec.py).

  @nn.compact
  def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    heads = self.num_heads
    qkv = dense(3 * channels, self.dtype, 'qkv')(x)
    lepe = DepthwiseConv(5, self.dtype, self.dwconv_impl, name='lepe')(qkv[..., 2 * channels:])
    # Channel m·C + head·d + e of qkv is element e of part m (q, k, v) of head `head`.
    tokens = qkv.reshape(batch, height * width, 3 * channels)
    if sec.fused_attention_applies(tokens.shape, heads, self.num_clusters, self.attention_impl,
                                   self.dtype):
      out, order = sec.fused_cluster_attention(tokens, sin, cos, heads, self.num_clusters)
    else:
      out, order = sec.xla_attention_from_qkv(tokens, sin, cos, heads, self.num_clusters,
                                              self.attention_impl)
    if order is not None:
      self.sow('intermediates', 'sort_order', order)
    out = out.reshape(batch, height, width, channels) + lepe
    return dense(channels, self.dtype, 'out_proj')(out)


class FFN(nn.Module):
  """fc1 (C -> rC) · GELU · + depthwise 3×3 · fc2 (rC -> C). (B, H, W, C) -> (B, H, W, C)."""
  mlp_ratio: int
  dtype: Dtype = jnp.float32
  dwconv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    h = gelu(dense(self.mlp_ratio * channels, self.dtype, 'fc1')(x))
    h = h + DepthwiseConv(3, self.dtype, self.dwconv_impl, name='dwconv')(h)
    return dense(channels, self.dtype, 'fc2')(h)


class Block(nn.Module):
  """One SecViT block: positional dwconv, clustered attention, FFN, each residual."""
  num_heads: int
  num_clusters: int
  mlp_ratio: int
  drop_path_rate: float
  layer_scale: bool
  dtype: Dtype = jnp.float32
  dwconv_impl: str = 'auto'
  attention_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array, train: bool) -> jax.Array:
    channels = x.shape[-1]
    x = x + DepthwiseConv(3, self.dtype, self.dwconv_impl, name='pos')(x)
    branches = (
        lambda y: SECAttention(self.num_heads, self.num_clusters, self.dtype, self.dwconv_impl,
                               self.attention_impl, name='attn')(y, sin, cos),
        lambda y: FFN(self.mlp_ratio, self.dtype, self.dwconv_impl, name='ffn')(y),
    )
    for index, branch in enumerate(branches, start=1):
      y = branch(layer_norm(self.dtype, f'norm{index}')(x))
      if self.layer_scale:
        gamma = self.param(f'gamma_{index}', nn.initializers.constant(1e-6), (channels,))
        y = y * gamma.astype(self.dtype)
      x = x + drop_path(y, self.drop_path_rate, self, train)
    return x


class Stem(nn.Module):
  """Four 3×3 convs (strides 2, 1, 1, 2) with BatchNorm: (B, H, W, 3) -> (B, H/4, W/4, C0)."""
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    strides = (2, 1, 1, 2)
    widths = (self.width // 2,) * 3 + (self.width,)
    for index, (features, stride) in enumerate(zip(widths, strides)):
      x = conv3x3(features, stride, self.dtype, f'conv_{index}')(x)
      x = batch_norm(train, self.dtype, f'bn_{index}')(x)
      if index < 3:
        x = gelu(x)
    return x


class Downsample(nn.Module):
  """3×3 conv stride 2 with BatchNorm: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), features)."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = conv3x3(self.features, 2, self.dtype, 'reduction')(x)
    return batch_norm(train, self.dtype, 'norm')(x)


def stage_resolutions(height: int, width: int, num_stages: int = 4) -> tuple[tuple[int, int], ...]:
  """(H_i, W_i) of each stage's feature map for an H×W input.

  The stem's two stride-2 convs and each downsample (3×3, padding 1) round up, so
  H_i = ceil(H / 2^(i+2)).
  """
  sizes = []
  height, width = -(-height // 4), -(-width // 4)  # ceil(ceil(H / 2) / 2) == ceil(H / 4).
  for _ in range(num_stages):
    sizes.append((height, width))
    height, width = -(-height // 2), -(-width // 2)
  return tuple(sizes)


def stage_num_clusters(tokens: int, num_clusters: int, tokens_per_cluster: int = 0) -> int:
  """The clusters of a stage of `tokens` tokens: ceil(tokens / tokens_per_cluster) when that is
  positive, else `num_clusters`. 1 or less means attention over all the stage's tokens."""
  if tokens_per_cluster < 0:
    raise ValueError(f'tokens_per_cluster must be positive, or 0 to keep num_clusters; got '
                     f'{tokens_per_cluster}')
  return -(-tokens // tokens_per_cluster) if tokens_per_cluster else num_clusters


class Stage(nn.Module):
  """The blocks of one resolution, then an optional downsample.

  (B, H, W, C) -> (features, downsampled): features (B, H, W, C) is the last block's output,
  downsampled (B, ceil(H/2), ceil(W/2), downsample_features) or None without a downsample. Builds
  the RoPE tables for (H, W) and clusters H·W tokens as `stage_num_clusters` says (any H·W: see
  `sec`).
  """
  num_heads: int
  num_clusters: int
  mlp_ratio: int
  drop_path_rates: Sequence[float]  # One per block; the stage's depth is its length.
  layer_scale: bool
  downsample_features: int | None
  dtype: Dtype = jnp.float32
  dwconv_impl: str = 'auto'
  remat: bool = False  # See SecViTStages.remat.
  tokens_per_cluster: int = 0
  attention_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array | None]:
    _, height, width, channels = x.shape
    clusters = stage_num_clusters(height * width, self.num_clusters, self.tokens_per_cluster)
    sin, cos = rope_tables(height, width, channels // self.num_heads)
    block_cls = nn.remat(Block, static_argnums=(4,)) if self.remat else Block
    for index, rate in enumerate(self.drop_path_rates):
      x = block_cls(self.num_heads, clusters, self.mlp_ratio, rate, self.layer_scale,
                    self.dtype, self.dwconv_impl, self.attention_impl,
                    name=f'block_{index}')(x, sin, cos, train)
    if self.downsample_features is None:
      return x, None
    return x, Downsample(self.downsample_features, self.dtype, name='downsample')(x, train)


class SecViTStages(nn.Module):
  """The stem and the stages: the fields and the code that the classifier (`SecViT`) and the
  backbone (`SecViTBackbone`) share, so both hold `stem/...` and `stage_{i}/...` alike.

  Stage i runs at `stage_resolutions(H, W)[i]` with `clusters_per_stage(H, W)[i]` clusters; any
  input size works (see `sec` for how a token count that the clusters do not divide is padded).
  Each clustering block sows its sort order as `stage_{i}/block_{j}/attn/sort_order` into the
  'intermediates' collection: (B, heads, n·s) int32, n clusters of s = ceil(L / n) tokens,
  entries >= L being pad slots after all L real tokens (`sec.cluster_attention`).
  """
  embed_dims: Sequence[int] = (64, 128, 256, 512)
  depths: Sequence[int] = (2, 2, 9, 2)
  num_heads: Sequence[int] = (2, 4, 8, 16)
  num_clusters: Sequence[int] = (32, 8, 2, -1)
  # One per stage: > 0 gives that stage ceil(tokens / tokens_per_cluster) clusters, so clusters
  # keep their size at any resolution; 0 keeps the stage's num_clusters. Empty: all 0.
  tokens_per_cluster: Sequence[int] = ()
  layer_scales: Sequence[bool] = (False, False, False, False)
  mlp_ratio: int = 3
  drop_path_rate: float = 0.1
  dtype: Dtype = jnp.float32
  dwconv_impl: str = 'auto'
  # Recompute each block's activations in the backward pass, to save memory: on TPU it is what
  # lets secvit_l train at global batch 1024 on a v5e:4x4 (benchmarks.tpu_compile); on the CPU
  # XLA's memory analysis showed no saving.
  remat: bool = False
  # Attention inside the clusters: 'einsum' (XLA), 'cudnn' (GPUs, bfloat16/float16) or 'auto',
  # the measured default of the backend (`sec.resolve_attention_impl`).
  attention_impl: str = 'auto'

  def __post_init__(self):
    if self.tokens_per_cluster and len(self.tokens_per_cluster) != len(self.depths):
      raise ValueError(f'tokens_per_cluster {tuple(self.tokens_per_cluster)} needs one entry per '
                       f'stage ({len(self.depths)}), or none')
    super().__post_init__()

  def clusters_per_stage(self, height: int, width: int) -> tuple[int, ...]:
    """The cluster count of every stage for an H×W input (≤ 1: global attention)."""
    return tuple(
        stage_num_clusters(h * w, self.num_clusters[index], self._tokens_per_cluster(index))
        for index, (h, w) in enumerate(stage_resolutions(height, width, len(self.depths))))

  def _tokens_per_cluster(self, stage: int) -> int:
    return self.tokens_per_cluster[stage] if self.tokens_per_cluster else 0

  def _run_stages(self, images: jax.Array, train: bool,
                  num_stages: int) -> list[tuple[jax.Array, jax.Array | None]]:
    """Builds and runs the stem and stages 0 .. num_stages-1, each but the last downsampling.

    Called from the compact `__call__` of a subclass, so the modules are its children. Returns
    `Stage`'s (features, downsampled) of each stage. Stochastic depth rates are those of the
    whole network, whatever num_stages.
    """
    x = Stem(self.embed_dims[0], self.dtype, name='stem')(images, train)
    rates = np.linspace(0, self.drop_path_rate, sum(self.depths))
    first_block = 0
    outputs = []
    for index in range(num_stages):
      depth = self.depths[index]
      features, x = Stage(
          num_heads=self.num_heads[index], num_clusters=self.num_clusters[index],
          mlp_ratio=self.mlp_ratio,
          drop_path_rates=tuple(float(r) for r in rates[first_block:first_block + depth]),
          layer_scale=self.layer_scales[index],
          downsample_features=self.embed_dims[index + 1] if index + 1 < num_stages else None,
          dtype=self.dtype, dwconv_impl=self.dwconv_impl, remat=self.remat,
          tokens_per_cluster=self._tokens_per_cluster(index), attention_impl=self.attention_impl,
          name=f'stage_{index}')(x, train)
      first_block += depth
      outputs.append((features, x))
    return outputs


class SecViT(SecViTStages):
  """SecViT classifier. `__call__(images, train)`: (B, H, W, 3) normalized -> (B, classes) float32.

  Any input size (see `SecViTStages`). Each stage's output (after its downsample) is sown into the
  'intermediates' collection as `stage{i}`, and each clustering block's sort order as
  `stage_{i}/block_{j}/attn/sort_order`.
  """
  num_classes: int = 1000
  projection: int = 1024

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    stages = self._run_stages(images, train, len(self.depths))
    for index, (features, downsampled) in enumerate(stages):
      self.sow('intermediates', f'stage{index}', features if downsampled is None else downsampled)
    x = dense(self.projection, self.dtype, 'proj')(stages[-1][0])
    x = nn.swish(batch_norm(train, self.dtype, 'norm')(x))
    x = jnp.mean(x, axis=(1, 2))
    return dense(self.num_classes, self.dtype, 'head')(x).astype(jnp.float32)


class SecViTBackbone(SecViTStages):
  """SecViT as a backbone for dense prediction: multi-scale feature maps instead of logits.

  `__call__(images, train=False)`: (B, H, W, 3) normalized -> a tuple with, for each stage i of
  `out_indices`, its (B, H_i, W_i, C_i) output after its last block and before its downsample
  (H_i = `stage_resolutions(H, W)[i]`, about H / 2^(i+2)), in the compute dtype. With
  `output_norm`, each output goes through a LayerNorm of its own (`out_norm_{i}`, eps 1e-6, new
  parameters). Only stages 0 .. max(out_indices) are built, without the last one's downsample.
  Parameters `stem/...` and `stage_{i}/...` have the classifier's paths and shapes:
  `load_classifier_into_backbone` fills them from a classification checkpoint.
  """
  out_indices: Sequence[int] = (0, 1, 2, 3)
  output_norm: bool = True

  def __post_init__(self):
    indices = tuple(self.out_indices)
    if (not indices or list(indices) != sorted(set(indices))
        or not all(0 <= i < len(self.depths) for i in indices)):
      raise ValueError(f'out_indices must be increasing stage indices in 0..{len(self.depths) - 1}'
                       f', got {indices}')
    super().__post_init__()

  @property
  def feature_info(self) -> tuple[tuple[int, int], ...]:
    """(channels, stride) of each output, e.g. secvit_t ((64, 4), (128, 8), (256, 16), (512, 32)).
    The stride is nominal: sizes round up at every stride-2 conv."""
    return tuple((self.embed_dims[i], 2**(i + 2)) for i in self.out_indices)

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
    stages = self._run_stages(images, train, max(self.out_indices) + 1)
    outputs = []
    for index in self.out_indices:
      features = stages[index][0]
      if self.output_norm:
        features = layer_norm(self.dtype, f'out_norm_{index}')(features)
      outputs.append(features)
    return tuple(outputs)


# ------------------------------------------------------------------------------------------------
# Variants.
# ------------------------------------------------------------------------------------------------

VARIANTS: dict[str, dict[str, Any]] = {
    'secvit_t': dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 9, 2), num_heads=(2, 4, 8, 16),
                     layer_scales=(False, False, False, False), drop_path_rate=0.1),
    'secvit_s': dict(embed_dims=(64, 128, 256, 512), depths=(3, 4, 18, 4), num_heads=(2, 4, 8, 16),
                     layer_scales=(False, False, False, False), drop_path_rate=0.15),
    'secvit_b': dict(embed_dims=(80, 160, 320, 512), depths=(4, 8, 26, 8),
                     num_heads=(5, 5, 10, 16), layer_scales=(False, False, True, True),
                     drop_path_rate=0.4),
    'secvit_l': dict(embed_dims=(112, 224, 448, 640), depths=(4, 8, 26, 8),
                     num_heads=(7, 7, 14, 20), layer_scales=(False, False, True, True),
                     drop_path_rate=0.5),
}
for _variant in VARIANTS.values():
  _variant.update(num_clusters=(32, 8, 2, -1), mlp_ratio=3, projection=1024)
del _variant


def _from_variant(cls: type[SecViTStages], name: str, overrides: dict[str, Any]) -> Any:
  """`cls` with the fields of variant `name` that it has, replaced by `overrides`."""
  if name not in VARIANTS:
    raise ValueError(f'unknown SecViT variant {name!r}; choose one of {sorted(VARIANTS)}')
  fields = {f.name for f in dataclasses.fields(cls)} - {'parent', 'name'}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f'unknown {cls.__name__} field(s) {unknown}; fields are {sorted(fields)}')
  variant = {key: value for key, value in VARIANTS[name].items() if key in fields}
  return cls(**{**variant, **overrides})


def create_model(name: str, *, num_classes: int = 1000, dtype: Dtype = jnp.float32,
                 **overrides: Any) -> SecViT:
  """A SecViT variant by name ('secvit_t', 'secvit_s', 'secvit_b', 'secvit_l').

  `overrides` replace any field of the variant (e.g. `depths=(1, 1, 1, 1)`, `drop_path_rate=0`,
  `remat=True`, `dwconv_impl='xla'`, `tokens_per_cluster=(98, 98, 98, 0)`,
  `attention_impl='cudnn'`).
  """
  return _from_variant(SecViT, name, dict(overrides, num_classes=num_classes, dtype=dtype))


def create_backbone(name: str, *, out_indices: Sequence[int] = (0, 1, 2, 3),
                    output_norm: bool = True, **overrides: Any) -> SecViTBackbone:
  """A SecViT variant as a backbone of multi-scale feature maps (see `SecViTBackbone`).

  `overrides` replace any field of the variant, as in `create_model` (e.g.
  `tokens_per_cluster=(98, 98, 98, 0)`, `drop_path_rate`, `dtype=jnp.bfloat16`, `remat=True`).
  The stochastic depth rate stays the variant's classification rate unless overridden.
  """
  head_fields = sorted({'num_classes', 'projection'} & set(overrides))
  if head_fields:
    raise ValueError(f'a backbone has no classification head: drop {head_fields}')
  return _from_variant(SecViTBackbone, name,
                       dict(overrides, out_indices=tuple(out_indices), output_norm=output_norm))


# ------------------------------------------------------------------------------------------------
# A classifier's variables in a backbone.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BackboneLoad:
  """What `load_classifier_into_backbone` did. Paths are '/'-joined, starting with the collection.

  loaded: target entries filled from the classifier (under `at` in each collection).
  left_out: classifier entries the backbone has no place for (proj, norm, head, stages after the
    last output, the last built stage's downsample).
  initialized: target entries that keep the value they had (output norms, the heads of a model
    that nests the backbone).
  """
  loaded: tuple[str, ...]
  left_out: tuple[str, ...]
  initialized: tuple[str, ...]
  at: str = ''

  def __str__(self) -> str:
    """One line for a log, naming modules rather than arrays (e.g. 'head', 'stage_3')."""
    depth = 1 + len([part for part in self.at.split('/') if part])
    sources = [key.split('/', depth)[-1] for key in self.loaded]
    left_out = sorted(_fold([key.split('/', 1)[1] for key in self.left_out], sources))
    initialized = sorted(_fold([key.split('/', 1)[1] for key in self.initialized],
                               [key.split('/', 1)[1] for key in self.loaded]))
    return (f'loaded {len(self.loaded)} arrays; left out of the classifier: '
            f'{", ".join(left_out) or "nothing"}; kept as initialized: '
            f'{", ".join(initialized) or "nothing"}')


def _fold(paths: Sequence[str], others: Sequence[str]) -> list[str]:
  """Module paths (no collection) as modules: each cut at its shortest prefix under which none
  of `others` lies."""
  other_prefixes = {key.rsplit('/', i)[0] for key in others for i in range(1, key.count('/') + 1)}
  modules = []
  for path in paths:
    parts = path.split('/')
    module = next(('/'.join(parts[:cut]) for cut in range(1, len(parts))
                   if '/'.join(parts[:cut]) not in other_prefixes), path.rsplit('/', 1)[0])
    if module not in modules:
      modules.append(module)
  return modules


# Modules of a classifier that a backbone never holds, besides whole stages after its last output.
_CLASSIFIER_ONLY = re.compile(r'(proj|norm|head|stage_\d+/downsample)(/|$)')


def load_classifier_into_backbone(
    target: Mapping[str, Any], classifier: Mapping[str, Any], *, at: str = ''
) -> tuple[dict[str, Any], BackboneLoad]:
  """Fills a backbone's stem and stages with a classifier's variables. Pure and host-side.

  Args:
    target: the variables of a `SecViTBackbone`, or of a model that nests one (then `at` says
      where), e.g. `{'params': {'backbone': {...}, 'decode_head': {...}}, 'batch_stats': ...}`.
      Leaves are arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape(model.init, ...)`).
    classifier: a `SecViT` classifier's {'params', 'batch_stats'}, e.g. `load_variables(path)` of
      a converted or trained checkpoint, as host NumPy arrays.
    at: the backbone's path inside each collection of `target`, '/'-separated ('backbone',
      'encoder/backbone'); '' when `target` is the backbone's own variables.

  Returns:
    (variables, report): `target`'s tree (nested dicts) with each backbone entry of `stem/` and
    `stage_{i}/` replaced by the classifier's array as NumPy in the target's dtype, every other
    leaf as it was (a ShapeDtypeStruct stays one: it is for the caller to initialize), and a
    `BackboneLoad` naming what was loaded, left out and left initialized.

  Raises:
    ValueError: naming the entries whose shape differs, the backbone entries of `stem/` and
      `stage_{i}/` that the classifier lacks and the classifier entries of a built stage that the
      backbone lacks (another variant or depth; the first 10, and how many more), or naming `at`
      when `target` has no such subtree.
  """
  prefix = tuple(part for part in at.split('/') if part)
  flat_target = traverse_util.flatten_dict(dict(target), sep='/')
  flat_classifier = traverse_util.flatten_dict(dict(classifier), sep='/')
  if prefix and not any(key.split('/')[1:len(prefix) + 1] == list(prefix) for key in flat_target):
    raise ValueError(f'the target variables have no {at!r} in any collection')

  def backbone_path(key: str) -> str | None:
    """The path inside the backbone ('stem/...') of a target key, or None outside it."""
    parts = key.split('/')
    if tuple(parts[1:len(prefix) + 1]) != prefix:
      return None
    return '/'.join(parts[len(prefix) + 1:])

  def target_key(collection: str, path: str) -> str:
    return '/'.join((collection,) + prefix + (path,))

  built_stages = {path.split('/')[0] for key in flat_target
                  if (path := backbone_path(key)) and path.startswith('stage_')}
  stages_and_stem = built_stages | {'stem'}
  loaded, left_out, problems, matched = [], [], [], set()
  for key, value in flat_classifier.items():
    collection, path = key.split('/', 1)
    destination = target_key(collection, path)
    if destination in flat_target:
      matched.add(destination)
      expected = flat_target[destination]
      if tuple(value.shape) != tuple(expected.shape):
        problems.append(f'{destination} has shape {tuple(value.shape)} in the classifier, '
                        f'{tuple(expected.shape)} in the backbone')
        continue
      loaded.append((destination, key))
    elif _CLASSIFIER_ONLY.match(path) or path.split('/')[0] not in stages_and_stem:
      left_out.append(key)
    else:
      problems.append(f'{key} of the classifier has no place in the backbone')
  for key in flat_target:
    path = backbone_path(key)
    if key not in matched and path is not None and path.split('/')[0] in stages_and_stem:
      problems.append(f'{key} of the backbone is not in the classifier')
  if problems:
    more = f'; and {len(problems) - 10} more' if len(problems) > 10 else ''
    raise ValueError(f'the classifier does not fit the backbone (another variant?): '
                     f'{"; ".join(problems[:10])}{more}')
  merged = dict(flat_target)
  for destination, key in loaded:
    merged[destination] = np.asarray(flat_classifier[key], dtype=flat_target[destination].dtype)
  initialized = tuple(key for key in flat_target if key not in matched)
  return (traverse_util.unflatten_dict(merged, sep='/'),
          BackboneLoad(tuple(d for d, _ in loaded), tuple(left_out), initialized, '/'.join(prefix)))
