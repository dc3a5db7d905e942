"""SecViT (arXiv 2405.13337) in Flax linen: modules, the four released variants, `create_model`.

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
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

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


def layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
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


def conv3x3(features: int, stride: int, dtype: Dtype, name: str) -> nn.Conv:
  # Explicit (1, 1) padding: 'SAME' would pad a stride-2 conv of an even input as (0, 1).
  return nn.Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                 dtype=dtype, kernel_init=conv_init, name=name)


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


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """x·cos + rot(x)·sin, rot mapping each pair (x[2t], x[2t+1]) to (-x[2t+1], x[2t]).

  x: (B, heads, L, d); sin, cos: (L, d).
  """
  pairs = x.reshape(*x.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  return x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)


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
    heads, head_dim = self.num_heads, channels // self.num_heads
    qkv = dense(3 * channels, self.dtype, 'qkv')(x)
    lepe = DepthwiseConv(5, self.dtype, self.dwconv_impl, name='lepe')(qkv[..., 2 * channels:])
    # (B, H, W, 3C) -> 3 × (B, heads, L, d); channel m·C + head·d + e is part m of head `head`.
    qkv = qkv.reshape(batch, height * width, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = apply_rope(q, sin, cos)
    k = apply_rope(k, sin, cos) * head_dim**-0.5
    out, order = sec.cluster_attention(q, k, v, self.num_clusters, self.attention_impl)
    if order is not None:
      self.sow('intermediates', 'sort_order', order)
    out = out.transpose(0, 2, 1, 3).reshape(batch, height, width, channels) + lepe
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


class Stage(nn.Module):
  """The blocks of one resolution, then an optional downsample.

  (B, H, W, C) -> (B, H, W, C), or (B, ceil(H/2), ceil(W/2), downsample_features). Builds the RoPE
  tables for (H, W); H·W must be divisible by `num_clusters` when clustering.
  """
  num_heads: int
  num_clusters: int
  mlp_ratio: int
  drop_path_rates: Sequence[float]  # One per block; the stage's depth is its length.
  layer_scale: bool
  downsample_features: int | None
  dtype: Dtype = jnp.float32
  dwconv_impl: str = 'auto'
  # Recompute each block's activations in the backward pass, to save memory (on the CPU XLA's
  # memory analysis showed no saving; unmeasured on TPU).
  remat: bool = False
  attention_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    _, height, width, channels = x.shape
    tokens = height * width
    if self.num_clusters > 1 and tokens % self.num_clusters:
      raise ValueError(
          f'{self.name} has {height}×{width} = {tokens} tokens, not divisible by its '
          f'{self.num_clusters} clusters: choose an input size whose stage token counts divide by '
          'the cluster counts')
    sin, cos = rope_tables(height, width, channels // self.num_heads)
    block_cls = nn.remat(Block, static_argnums=(4,)) if self.remat else Block
    for index, rate in enumerate(self.drop_path_rates):
      x = block_cls(self.num_heads, self.num_clusters, self.mlp_ratio, rate, self.layer_scale,
                    self.dtype, self.dwconv_impl, self.attention_impl,
                    name=f'block_{index}')(x, sin, cos, train)
    if self.downsample_features is not None:
      x = Downsample(self.downsample_features, self.dtype, name='downsample')(x, train)
    return x


class SecViT(nn.Module):
  """SecViT classifier. `__call__(images, train)`: (B, H, W, 3) normalized -> (B, classes) float32.

  Stage i runs at (H/4/2^i, W/4/2^i) (rounded up at each stride-2 conv); its token count must be
  divisible by its cluster count, else a ValueError names the stage. Each stage's output (after its
  downsample) is sown into the 'intermediates' collection as `stage{i}`, and each clustering
  block's sort order as `stage_{i}/block_{j}/attn/sort_order`.
  """
  num_classes: int = 1000
  embed_dims: Sequence[int] = (64, 128, 256, 512)
  depths: Sequence[int] = (2, 2, 9, 2)
  num_heads: Sequence[int] = (2, 4, 8, 16)
  num_clusters: Sequence[int] = (32, 8, 2, -1)
  layer_scales: Sequence[bool] = (False, False, False, False)
  mlp_ratio: int = 3
  projection: int = 1024
  drop_path_rate: float = 0.1
  dtype: Dtype = jnp.float32
  dwconv_impl: str = 'auto'
  # Recompute each block's activations in the backward pass, to save memory (on the CPU XLA's
  # memory analysis showed no saving; unmeasured on TPU).
  remat: bool = False
  # Attention inside the clusters: 'einsum' (XLA), 'cudnn' (GPUs, bfloat16/float16) or 'auto',
  # the measured default of the backend (`sec.resolve_attention_impl`).
  attention_impl: str = 'auto'

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    x = Stem(self.embed_dims[0], self.dtype, name='stem')(images, train)
    rates = np.linspace(0, self.drop_path_rate, sum(self.depths))
    first_block = 0
    for index, depth in enumerate(self.depths):
      last = index + 1 == len(self.depths)
      x = Stage(
          num_heads=self.num_heads[index], num_clusters=self.num_clusters[index],
          mlp_ratio=self.mlp_ratio,
          drop_path_rates=tuple(float(r) for r in rates[first_block:first_block + depth]),
          layer_scale=self.layer_scales[index],
          downsample_features=None if last else self.embed_dims[index + 1],
          dtype=self.dtype, dwconv_impl=self.dwconv_impl, remat=self.remat,
          attention_impl=self.attention_impl, name=f'stage_{index}')(x, train)
      first_block += depth
      self.sow('intermediates', f'stage{index}', x)
    x = dense(self.projection, self.dtype, 'proj')(x)
    x = nn.swish(batch_norm(train, self.dtype, 'norm')(x))
    x = jnp.mean(x, axis=(1, 2))
    return dense(self.num_classes, self.dtype, 'head')(x).astype(jnp.float32)


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


def create_model(name: str, *, num_classes: int = 1000, dtype: Dtype = jnp.float32,
                 **overrides: Any) -> SecViT:
  """A SecViT variant by name ('secvit_t', 'secvit_s', 'secvit_b', 'secvit_l').

  `overrides` replace any field of the variant (e.g. `depths=(1, 1, 1, 1)`, `drop_path_rate=0`,
  `remat=True`, `dwconv_impl='xla'`, `attention_impl='cudnn'`).
  """
  if name not in VARIANTS:
    raise ValueError(f'unknown SecViT variant {name!r}; choose one of {sorted(VARIANTS)}')
  fields = {f.name for f in dataclasses.fields(SecViT)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f'unknown SecViT field(s) {unknown}; fields are {sorted(fields)}')
  kwargs = {**VARIANTS[name], **overrides}
  return SecViT(num_classes=num_classes, dtype=dtype, **kwargs)
