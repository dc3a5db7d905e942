"""Native kernels for XLA's CPU backend (`cpu_kernels.cc`): depthwise convolution, the dense
convolution's kernel gradient, argsort, the token permutation, the fused cluster attention and its
sort scores (`sec.fused_cluster_attention`), and LayerNorm (`model.NativeLayerNorm`).

The C++ file is compiled on first use with the system's C++ compiler (`$CXX`, default `c++`)
against the XLA FFI headers shipped in jaxlib, cached under `$SECVIT_JAX_CACHE` (default
`~/.cache/secvit_jax`) by a hash of the source, the jaxlib version and the flags, and registered
as XLA FFI targets. `available()` says whether that worked; `use_native()` whether the model and
the clustering use them: on a single CPU device only, since XLA cannot partition a custom call
over a mesh. Otherwise they fall back to XLA's own code (`model.depthwise_conv(impl='shift')`,
`jnp.argsort`), with a warning when the build failed.

The depthwise ops take and return float32, NHWC:
  shifted_sum(x (B, H, W, C), taps (k, k, C)) -> (B, H, W, C):
      out[b, h, w, c] = sum_ij x[b, h + i - k//2, w + j - k//2, c] · taps[i, j, c], zero-padded.
  kernel_grad(x (B, H, W, C), cotangent (B, H, W, C), size k) -> (k, k, C):
      dk[i, j, c] = sum_bhw x[b, h + i - k//2, w + j - k//2, c] · cotangent[b, h, w, c].
  conv_kernel_grad(x (B, H, W, Cin), cotangent (B, Ho, Wo, Cout), size k, stride s)
      -> (k, k, Cin, Cout): the kernel gradient of a dense k×k convolution (k odd, zero padding
      k // 2, stride s), dw[i, j, ci, co] = sum x[b, s·ho + i - k//2, s·wo + j - k//2, ci] ·
      cotangent[b, ho, wo, co]; Cout a multiple of 32.
  argsort(scores (..., L) float32) -> (..., L) int32: jnp.argsort(scores, axis=-1) as XLA's CPU
      backend computes it (stable; NaNs last; ±0.0 and denormals equal), element for element.
  gather_rows(x (..., L, D) any dtype, index (..., L) int32) -> (..., L, D):
      out[..., i, :] = x[..., index[..., i], :] (the token permutation); an index outside [0, L)
      is an error.
"""

from __future__ import annotations

import ctypes
import functools
import os
import pathlib
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from secvit_jax import native_build

_SOURCE = pathlib.Path(__file__).with_name('cpu_kernels.cc')
# -march=native: the library is built on the machine that runs it, never shipped.
_FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC')
_TARGETS = {'depthwise_shifted_sum': 'SecvitDepthwiseShiftedSum',
            'depthwise_kernel_grad': 'SecvitDepthwiseKernelGrad',
            'conv_kernel_grad': 'SecvitConvKernelGrad', 'argsort': 'SecvitArgsort',
            'gather_rows': 'SecvitGatherRows', 'cluster_attention': 'SecvitClusterAttention',
            'cluster_attention_grad': 'SecvitClusterAttentionGrad',
            'sort_scores': 'SecvitSortScores', 'layer_norm': 'SecvitLayerNorm',
            'layer_norm_grad': 'SecvitLayerNormGrad'}


def _build() -> pathlib.Path:
  """Compiles the kernels once per (source, jaxlib, flags); returns the shared library's path."""
  return native_build.build(_SOURCE, compiler_env='CXX', default_compiler='c++',
                            flags=(*_FLAGS, f'-I{jax.ffi.include_dir()}'),
                            key_extra=jaxlib.__version__)


@functools.cache
def available() -> bool:
  """Builds, loads and registers the kernels on first call; False (with a warning) if that fails."""
  try:
    library = ctypes.cdll.LoadLibrary(str(_build()))
  except (OSError, RuntimeError) as error:
    warnings.warn(f'native CPU kernels unavailable, using XLA instead: {error}')
    return False
  for op, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(f'secvit_{op}',
                                jax.ffi.pycapsule(getattr(library, symbol)), platform='cpu')
  return True


# Set to '0' to never use the kernels: benchmarks/tpu_compile.py traces for a TPU on a CPU host.
DISABLE_ENV = 'SECVIT_JAX_CPU_KERNELS'


def use_native() -> bool:
  """Whether to use these kernels: JAX's default backend is the CPU, with one device, the kernels
  built, and $SECVIT_JAX_CPU_KERNELS is not '0'. Decided when a function is traced."""
  return (os.environ.get(DISABLE_ENV) != '0' and jax.default_backend() == 'cpu' and
          jax.device_count() == 1 and available())


def _call(target: str, result: jax.ShapeDtypeStruct | tuple[jax.ShapeDtypeStruct, ...],
          *operands: jax.Array, **attributes: int) -> Any:
  if not available():
    raise RuntimeError('native CPU kernels are unavailable (see the warning)')
  return jax.ffi.ffi_call(f'secvit_{target}', result)(*operands, **attributes)


def shifted_sum(x: jax.Array, taps: jax.Array) -> jax.Array:
  return _call('depthwise_shifted_sum', jax.ShapeDtypeStruct(x.shape, jnp.float32),
               x.astype(jnp.float32), taps.astype(jnp.float32))


def kernel_grad(x: jax.Array, cotangent: jax.Array, size: int) -> jax.Array:
  return _call('depthwise_kernel_grad',
               jax.ShapeDtypeStruct((size, size, x.shape[-1]), jnp.float32),
               x.astype(jnp.float32), cotangent.astype(jnp.float32))


def conv_kernel_grad(x: jax.Array, cotangent: jax.Array, size: int, stride: int) -> jax.Array:
  return _call('conv_kernel_grad',
               jax.ShapeDtypeStruct((size, size, x.shape[-1], cotangent.shape[-1]), jnp.float32),
               x.astype(jnp.float32), cotangent.astype(jnp.float32), stride=stride)


def argsort(scores: jax.Array) -> jax.Array:
  return _call('argsort', jax.ShapeDtypeStruct(scores.shape, jnp.int32),
               scores.astype(jnp.float32))


def gather_rows(x: jax.Array, index: jax.Array) -> jax.Array:
  return _call('gather_rows', jax.ShapeDtypeStruct(x.shape, x.dtype), x, index.astype(jnp.int32))


def cluster_attention(qkv: jax.Array, sin: jax.Array, cos: jax.Array, order: jax.Array,
                      heads: int, cluster: int) -> tuple[jax.Array, jax.Array]:
  """(out (B, L, C), lse (B, heads, L)) from qkv (B, L, 3C): see `sec.fused_cluster_attention`."""
  batch, length, channels = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
  return _call('cluster_attention',
               (jax.ShapeDtypeStruct((batch, length, channels), jnp.float32),
                jax.ShapeDtypeStruct(order.shape, jnp.float32)),
               qkv.astype(jnp.float32), sin.astype(jnp.float32), cos.astype(jnp.float32),
               order.astype(jnp.int32), heads=heads, cluster=cluster)


def cluster_attention_grad(qkv: jax.Array, sin: jax.Array, cos: jax.Array, order: jax.Array,
                           lse: jax.Array, cotangent: jax.Array, heads: int,
                           cluster: int) -> jax.Array:
  """d qkv (B, L, 3C) from the cotangent of `cluster_attention`'s out (B, L, C)."""
  return _call('cluster_attention_grad', jax.ShapeDtypeStruct(qkv.shape, jnp.float32),
               qkv.astype(jnp.float32), sin.astype(jnp.float32), cos.astype(jnp.float32),
               order.astype(jnp.int32), lse, cotangent.astype(jnp.float32), heads=heads,
               cluster=cluster)


def sort_scores(qkv: jax.Array, sin: jax.Array, cos: jax.Array, heads: int) -> jax.Array:
  """The semantic sort's scores (B, heads, L) from qkv rows (B, L, 3C): see
  `sec.fused_cluster_attention`."""
  batch, length = qkv.shape[:2]
  return _call('sort_scores', jax.ShapeDtypeStruct((batch, heads, length), jnp.float32),
               qkv.astype(jnp.float32), sin.astype(jnp.float32), cos.astype(jnp.float32),
               heads=heads)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array,
               epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(y, mean, rstd) of LayerNorm over x's last axis: see `model.NativeLayerNorm`."""
  rows = x.shape[:-1]
  return _call('layer_norm', (jax.ShapeDtypeStruct(x.shape, jnp.float32),
                              jax.ShapeDtypeStruct(rows, jnp.float32),
                              jax.ShapeDtypeStruct(rows, jnp.float32)),
               x.astype(jnp.float32), scale.astype(jnp.float32), bias.astype(jnp.float32),
               epsilon=np.float32(epsilon))


def layer_norm_grad(x: jax.Array, scale: jax.Array, mean: jax.Array, rstd: jax.Array,
                    cotangent: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(dx, dscale, dbias) of `layer_norm` for the cotangent of its y."""
  return _call('layer_norm_grad', (jax.ShapeDtypeStruct(x.shape, jnp.float32),
                                   jax.ShapeDtypeStruct(scale.shape, jnp.float32),
                                   jax.ShapeDtypeStruct(scale.shape, jnp.float32)),
               x.astype(jnp.float32), scale.astype(jnp.float32), mean, rstd,
               cotangent.astype(jnp.float32))
