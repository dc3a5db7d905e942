"""Semantic equitable clustering (SEC): attention inside clusters of tokens grouped by meaning.

Pure functions, no parameters. Every array in here is laid out as (batch, heads, tokens, head_dim)
with tokens in row-major order of the feature map (token `r * W + c` is row r, column c).

The clustering is one sort: each token's key is scored by its cosine similarity to the mean key of
its (batch, head), the tokens are put in ascending order of that score, and the sorted sequence is
cut into `num_clusters` consecutive clusters of equal size. Softmax attention runs inside each
cluster, and each output is put back at its token's original position. Shapes are static
throughout (the clusters are a reshape), so the op compiles under `jax.jit` and shards on the batch
axis like any other batched op.

Any token count L works. With n clusters of s = ceil(L / n) tokens, the sorted sequence of the L
real tokens is followed by n·s - L pad slots: the pads sit in the last cluster(s), no query
attends to them (their keys are masked), and their outputs are dropped. Where n·s == L no padding
code runs. Clusters made only of pad slots (n·s - L >= s, e.g. L < n) are not computed at all:
they hold no real token, so nothing of them would be kept.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from secvit_jax import cpu_kernels


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """The release's 2-D rotary embedding: x·cos + rot(x)·sin, rot mapping each pair
  (x[2t], x[2t+1]) to (-x[2t+1], x[2t]).

  x: (B, heads, L, d); sin, cos: (L, d) (`model.rope_tables`).
  """
  pairs = x.reshape(*x.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  return x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)


def semantic_sort_order(keys: jax.Array) -> jax.Array:
  """The token order that groups tokens by meaning.

  Args:
    keys: (B, heads, L, d) keys, already scaled by d**-0.5 as the attention uses them.

  Returns:
    (B, heads, L) int32 permutation: position i of the sorted sequence holds token `order[..., i]`,
    in ascending order of cosine similarity between a token's key and the mean key. Scores are
    computed in float32 whatever the compute dtype, and no gradient flows through them.
  """
  keys = jax.lax.stop_gradient(keys).astype(jnp.float32)
  center = jnp.mean(keys, axis=2, keepdims=True)
  # normalize(v) = v / max(|v|, 1e-12), as torch.nn.functional.normalize.
  keys_unit = keys / jnp.maximum(jnp.linalg.norm(keys, axis=-1, keepdims=True), 1e-12)
  center_unit = center / jnp.maximum(jnp.linalg.norm(center, axis=-1, keepdims=True), 1e-12)
  scores = jnp.sum(keys_unit * center_unit, axis=-1)
  if cpu_kernels.use_native():  # The same order, several times faster than XLA's CPU sort.
    return cpu_kernels.argsort(scores)
  return jnp.argsort(scores, axis=-1).astype(jnp.int32)


def inverse_permutation(order: jax.Array) -> jax.Array:
  """Inverse of a batch of permutations along the last axis, by one int32 scatter (no sort).

  Args:
    order: (..., L) int32, each row a permutation of 0..L-1.

  Returns:
    (..., L) int32 `inverse` with `inverse[..., order[..., i]] == i`.

  The scatter's indices along the leading axes are iotas of `order`'s shape (not `jnp.indices`,
  whose sizes must be concrete), so the batch may be a symbolic dimension (`jax.export` with a
  dynamic batch, `secvit_jax.export`); ONNX converters map this scatter to ScatterND.
  """
  leading = tuple(jax.lax.broadcasted_iota(order.dtype, order.shape, axis)
                  for axis in range(order.ndim - 1))
  positions = jax.lax.broadcasted_iota(order.dtype, order.shape, order.ndim - 1)
  return jnp.zeros_like(order).at[(*leading, order)].set(positions, unique_indices=True)


def _gather_tokens(x: jax.Array, index: jax.Array) -> jax.Array:
  """out[..., i, :] = x[..., index[..., i], :] along the token axis of (B, heads, L, d)."""
  if cpu_kernels.use_native():  # Whole rows at a time; XLA's CPU gather copies element-wise.
    return cpu_kernels.gather_rows(x, index)
  # A permutation is in bounds and non-negative: no index clipping, wrapping or fill mask.
  return jnp.take_along_axis(x, index[..., None], axis=2, mode='promise_in_bounds',
                             wrap_negative_indices=False)


@jax.custom_vjp
def permute_tokens(x: jax.Array, order: jax.Array, inverse: jax.Array) -> jax.Array:
  """Gathers tokens into `order`: (B, heads, L, d) -> (B, heads, L, d),
  out[..., i, :] = x[..., order[i], :].

  `inverse` must be `inverse_permutation(order)`. It is used only by the backward pass, which is
  the gather of the cotangent with `inverse`: equal, value for value, to the scatter-add that
  autodiff of a gather produces (each entry receives exactly one addend), and cheaper where
  scatters are slow (see benchmarks/clustering.py for the measurement that decides this). On a
  single CPU device both gathers are the native row copy of `cpu_kernels` (the stage-0 attention
  layer of secvit_s, forward and backward: 91 -> 74 ms).
  """
  del inverse
  return _gather_tokens(x, order)


def _permute_tokens_fwd(x, order, inverse):
  return permute_tokens(x, order, inverse), (order, inverse)


def _permute_tokens_bwd(residuals, cotangent):
  order, inverse = residuals
  return _gather_tokens(cotangent, inverse), None, None


permute_tokens.defvjp(_permute_tokens_fwd, _permute_tokens_bwd)


# The implementations of `softmax_attention`, and what 'auto' picks on each JAX backend. cuDNN's
# fused attention (GPUs, bfloat16/float16) is unmeasured so far: benchmarks/gpu.py measures it
# against the einsum path on a GPU, and the faster becomes the 'gpu' entry here.
ATTENTION_IMPLS = ('auto', 'einsum', 'cudnn')
AUTO_ATTENTION = {'cpu': 'einsum', 'gpu': 'einsum', 'tpu': 'einsum'}


def resolve_attention_impl(impl: str, dtype) -> str:
  """'einsum' or 'cudnn' for `impl` at this compute dtype: 'auto' takes AUTO_ATTENTION's entry
  for JAX's default backend, and 'einsum' wherever cuDNN cannot run (float32, no GPU).

  Raises:
    ValueError: an unknown impl, or 'cudnn' without a GPU or in float32 (naming both).
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f'attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}')
  backend = jax.default_backend()
  cudnn_runs = backend == 'gpu' and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
  if impl == 'auto':
    impl = AUTO_ATTENTION.get(backend, 'einsum')
    return impl if impl == 'einsum' or cudnn_runs else 'einsum'
  if impl == 'cudnn' and not cudnn_runs:
    raise ValueError(f"attention_impl='cudnn' needs a CUDA GPU and bfloat16 or float16 compute; "
                     f"here JAX's backend is {backend} and the dtype {jnp.dtype(dtype).name}: use "
                     "'einsum' or 'auto'")
  return impl


def _cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """`softmax_attention` by cuDNN's fused kernel: every leading axis (batch, heads, clusters) is
  folded into cuDNN's batch, one head each; (..., T, d) -> (..., T, d)."""
  tokens, head_dim = q.shape[-2:]
  folded = [t.reshape(-1, tokens, 1, head_dim) for t in (q, k, v)]
  out = jax.nn.dot_product_attention(*folded, scale=1.0, implementation='cudnn')
  return out.reshape(q.shape)


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                      key_mask: jax.Array | None = None, impl: str = 'einsum') -> jax.Array:
  """softmax(q kᵀ) v over the second-to-last axis of tokens: (..., T, d) -> (..., T, d).

  No scaling is applied here (SecViT scales the keys beforehand). With impl 'einsum' (XLA) the
  exponentials and their sums are float32 whatever the compute dtype; the result has q's dtype.
  The normalization divides the (T, d) output instead of the (T, T) weights, equal up to rounding
  and half the forward time on the CPU (6.3 against 14.9 ms at stage 0 of secvit_s, batch 8);
  the max is a constant shift of the logits, so no gradient flows through it. impl 'cudnn' is
  cuDNN's fused attention (`_cudnn_attention`; pass `resolve_attention_impl`'s answer).

  `key_mask`, a boolean array broadcastable to the (..., T, T) logits, keeps the keys where it is
  True: the others get the lowest float32 logit, so their weight is exactly 0 in any row with a
  kept key. A row with no kept key gets equal weights over its keys instead of 0/0: its output
  (meant to be discarded) and its gradients are finite, never NaN. A masked call always takes the
  einsum path (cuDNN's masking of rows without a kept key is unmeasured).
  """
  if impl == 'cudnn' and key_mask is None:
    return _cudnn_attention(q, k, v)
  logits = jnp.einsum('...qd,...kd->...qk', q, k).astype(jnp.float32)
  if key_mask is not None:
    logits = jnp.where(key_mask, logits, jnp.finfo(jnp.float32).min)
  weights = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
  out = jnp.einsum('...qk,...kd->...qd', weights.astype(v.dtype), v)
  return (out / jnp.sum(weights, axis=-1, keepdims=True)).astype(q.dtype)


def attend_within_clusters(q: jax.Array, k: jax.Array, v: jax.Array, cluster_size: int,
                           impl: str = 'einsum') -> jax.Array:
  """Attention inside consecutive clusters of `cluster_size` tokens: (B, heads, L, d) -> same.

  Tokens [c·s, (c+1)·s) form cluster c. When L is not a multiple of s, the last cluster is
  completed with pad tokens (zeros) whose keys are masked, and their outputs are dropped; where
  it is a multiple, this is a reshape and `softmax_attention` (with `impl`), nothing else.
  """
  batch, heads, length, head_dim = q.shape
  clusters = -(-length // cluster_size)
  pad = clusters * cluster_size - length
  clustered_shape = (batch, heads, clusters, cluster_size, head_dim)
  if not pad:
    return softmax_attention(*(t.reshape(clustered_shape) for t in (q, k, v)),
                             impl=impl).reshape(q.shape)
  padded = (jnp.pad(t, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(clustered_shape)
            for t in (q, k, v))
  # Static: the pads are the last `pad` slots, all in the last cluster. (clusters, 1, s) keys.
  real_keys = (np.arange(clusters * cluster_size) < length).reshape(clusters, 1, cluster_size)
  out = softmax_attention(*padded, key_mask=real_keys)
  return out.reshape(batch, heads, clusters * cluster_size, head_dim)[:, :, :length]


def cluster_tokens(length: int, num_clusters: int) -> int:
  """Tokens per cluster, s = ceil(L / n); all L when not clustering (n <= 1)."""
  return -(-length // num_clusters) if num_clusters > 1 else length


def cluster_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, num_clusters: int, impl: str = 'auto'
) -> tuple[jax.Array, jax.Array | None]:
  """Attention inside semantic equitable clusters, for any token count L.

  Args:
    q, k, v: (B, heads, L, d); k already scaled by d**-0.5.
    num_clusters: n, clusters per (batch, head). With 1 or less (the release writes -1 for its
      last stage) this is plain softmax attention over all L tokens.
    impl: the attention inside the clusters, one of ATTENTION_IMPLS (`resolve_attention_impl`).

  Returns:
    (out, order). out: (B, heads, L, d) in the original token order. order: (B, heads, n·s)
    int32 with s = ceil(L / n), the clustered sequence (None when not clustering): entries < L
    are the real tokens' indices (row-major `r * W + c`) in stable ascending order of their
    score, entries >= L are the n·s - L pad slots, after every real token. Token t belongs to
    cluster (position of t in `order`) // s.
  """
  impl = resolve_attention_impl(impl, q.dtype)
  if num_clusters <= 1:
    return softmax_attention(q, k, v, impl=impl), None
  cluster_size = cluster_tokens(q.shape[2], num_clusters)
  order = semantic_sort_order(k)
  inverse = inverse_permutation(order)
  out_sorted = attend_within_clusters(
      *(permute_tokens(t, order, inverse) for t in (q, k, v)), cluster_size, impl)
  out = permute_tokens(out_sorted, inverse, order)
  return out, with_pad_slots(order, num_clusters)


def with_pad_slots(order: jax.Array, num_clusters: int) -> jax.Array:
  """The sort order (B, heads, L) followed by the n·s - L pad slots L, L + 1, ... (n·s,)."""
  batch, heads, length = order.shape
  pad = num_clusters * cluster_tokens(length, num_clusters) - length
  if not pad:
    return order
  pad_slots = jnp.arange(length, length + pad, dtype=order.dtype)
  return jnp.concatenate([order, jnp.broadcast_to(pad_slots, (batch, heads, pad))], axis=-1)


def xla_attention_from_qkv(qkv: jax.Array, sin: jax.Array, cos: jax.Array, heads: int,
                           num_clusters: int, impl: str = 'auto'
                           ) -> tuple[jax.Array, jax.Array | None]:
  """SecViT's attention from the qkv projection's rows through XLA ops: the head split, the
  rotary embedding and key scale d**-0.5, `cluster_attention` (with `impl`) and the head merge.

  Args and returns as `fused_cluster_attention`: qkv (B, L, 3C) -> (out (B, L, C), order).
  """
  batch, length, channels = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
  head_dim = channels // heads
  q, k, v = qkv.reshape(batch, length, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
  q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos) * head_dim**-0.5
  out, order = cluster_attention(q, k, v, num_clusters, impl)
  return out.transpose(0, 2, 1, 3).reshape(batch, length, channels), order


# ------------------------------------------------------------------------------------------------
# The CPU's fused path: attention from the qkv projection's rows in one native kernel.
# ------------------------------------------------------------------------------------------------

# The largest cluster the fused kernel takes: its per-thread scratch grows as T², 2 MB at 512.
FUSED_MAX_CLUSTER = 512
FUSED_HEAD_DIMS = (16, 32, 64)


def fused_attention_applies(tokens_shape: tuple[int, ...], heads: int, num_clusters: int,
                            impl: str, dtype) -> bool:
  """Whether `fused_cluster_attention` runs for qkv rows of `tokens_shape` (B, L, 3C): impl
  'auto', float32, on a single CPU device with the native kernels (`cpu_kernels.use_native`),
  a head dim in FUSED_HEAD_DIMS, and clusters of at most FUSED_MAX_CLUSTER tokens (with or
  without pad slots). Elsewhere the attention goes through XLA (`xla_attention_from_qkv`)."""
  length, channels = tokens_shape[1], tokens_shape[2] // 3
  cluster = cluster_tokens(length, num_clusters)
  return (impl == 'auto' and jnp.dtype(dtype) == jnp.float32 and
          channels % heads == 0 and channels // heads in FUSED_HEAD_DIMS and
          cluster <= FUSED_MAX_CLUSTER and cpu_kernels.use_native())


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused_attention(qkv, sin, cos, order, heads, cluster):
  return cpu_kernels.cluster_attention(qkv, sin, cos, order, heads, cluster)[0]


def _fused_attention_fwd(qkv, sin, cos, order, heads, cluster):
  out, lse = cpu_kernels.cluster_attention(qkv, sin, cos, order, heads, cluster)
  return out, (qkv, sin, cos, order, lse)


def _fused_attention_bwd(heads, cluster, residuals, cotangent):
  qkv, sin, cos, order, lse = residuals
  dqkv = cpu_kernels.cluster_attention_grad(qkv, sin, cos, order, lse, cotangent, heads, cluster)
  return dqkv.astype(qkv.dtype), None, None, None  # The tables are constants; order an index.


_fused_attention.defvjp(_fused_attention_fwd, _fused_attention_bwd)


def fused_cluster_attention(qkv: jax.Array, sin: jax.Array, cos: jax.Array, heads: int,
                            num_clusters: int) -> tuple[jax.Array, jax.Array | None]:
  """SecViT's attention from the qkv projection: the rotary embedding, the key scale d**-0.5, the
  semantic sort and attention inside the clusters, in native CPU kernels: the sort's scores
  (`cpu_kernels.sort_scores`, summed in double, so the scores are the exact ones rounded once),
  the argsort, and one kernel per pass for the rest. Equal to `cluster_attention` on the heads of
  `qkv` up to float rounding; only where `fused_attention_applies`. Where two scores are within
  float32 rounding of each other, XLA's scores can order them the other way: 6 of 50,176
  positions at stage 0 of secvit_t (random inputs, batch 8), none here against scores computed in
  float64.

  Args:
    qkv: (B, L, 3C) float32, channel m·C + h·d + e being element e of part m (q, k, v) of head h.
    sin, cos: (L, d) rotary tables (`model.rope_tables`).
    heads: the number of heads, C / d.
    num_clusters: as `cluster_attention`; 1 or less attends over all L tokens. Where n clusters
      of s = ceil(L / n) tokens leave pad slots, the kernel's last cluster of each (b, h) is
      shorter: attention over its real tokens alone is attention with the pads' keys masked.

  Returns:
    (out, order): out (B, L, C), heads merged as in qkv; order (B, heads, n·s) int32 as
    `cluster_attention`'s, pad slots included (None when not clustering).

  Why: on the CPU, XLA's code for the same work (the head split and merge transposes, RoPE, the
  row gathers and scatters, the batched (T, d) dots and the softmax) moved each activation several
  times; this reads each qkv row once per pass. One stage-0 attention of secvit_t at batch 8,
  forward and backward (benchmarks/attention.py, benchmarks/results/attention.json): XLA 55.8
  against 25.3 ms. The scores alone: 4.4 against 2.5 ms with the argsort.
  """
  batch, length = qkv.shape[:2]
  if num_clusters > 1:  # `semantic_sort_order`'s scores, from the qkv rows in one native pass.
    scores = cpu_kernels.sort_scores(jax.lax.stop_gradient(qkv), sin, cos, heads)  # No gradient.
    order = indices = cpu_kernels.argsort(scores)
  else:  # One cluster of all L tokens in their own order.
    order, indices = None, jax.lax.broadcasted_iota(jnp.int32, (batch, heads, length), 2)
  out = _fused_attention(qkv, sin, cos, indices, heads, cluster_tokens(length, num_clusters))
  return out.astype(qkv.dtype), None if order is None else with_pad_slots(order, num_clusters)
