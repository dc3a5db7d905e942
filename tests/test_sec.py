"""The clustering op against a plain NumPy loop, and its structural properties."""

import functools
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from secvit_jax import cpu_kernels
from secvit_jax import sec


def _qkv(batch=2, heads=3, length=24, head_dim=8, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(key, (batch, heads, length, head_dim)) for key in keys)


def _numpy_cluster_attention(q, k, v, num_clusters):
  """SEC as the issue states it, one (batch, head, cluster) at a time, for any token count L.

  s = ceil(L / n); the real tokens in stable ascending order of score, then n·s - L pad slots;
  cluster c is slots [c·s, (c+1)·s); its queries attend to its real keys only. Returns (out,
  order), order (B, heads, n·s) with the pad slots numbered L, L+1, ...
  """
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  out = np.zeros_like(q)
  batch, heads, length, _ = q.shape
  size = -(-length // num_clusters)
  orders = np.zeros((batch, heads, num_clusters * size), np.int64)
  for b in range(batch):
    for h in range(heads):
      center = k[b, h].mean(axis=0)
      scores = (k[b, h] / np.linalg.norm(k[b, h], axis=-1, keepdims=True)) @ (
          center / np.linalg.norm(center))
      order = np.concatenate([np.argsort(scores, kind='stable'),
                              np.arange(length, num_clusters * size)])
      orders[b, h] = order
      for c in range(num_clusters):
        tokens = [t for t in order[c * size:(c + 1) * size] if t < length]
        if not tokens:
          continue
        logits = q[b, h, tokens] @ k[b, h, tokens].T
        weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        out[b, h, tokens] = weights @ v[b, h, tokens]
  return out, orders


# (tokens, clusters): divisible, one pad slot, a last cluster of one real token, a whole cluster
# of padding (9 = 3 + 3 + 3 + 0), fewer tokens than clusters.
SIZES = [(24, 2), (24, 4), (24, 6), (25, 4), (10, 4), (9, 4), (3, 8)]


@pytest.mark.parametrize('native', [False, True])
@pytest.mark.parametrize('length,num_clusters', SIZES)
def test_matches_numpy_loop_over_clusters(length, num_clusters, native, monkeypatch):
  monkeypatch.setattr(cpu_kernels, 'use_native', lambda: native)
  q, k, v = _qkv(length=length)
  with jax.default_matmul_precision('highest'):
    out, order = jax.jit(sec.cluster_attention, static_argnums=3)(q, k, v, num_clusters)
  want_out, want_order = _numpy_cluster_attention(q, k, v, num_clusters)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(order, want_order)
  chex.assert_type(order, jnp.int32)


def _jnp_loop_cluster_attention(q, k, v, order, num_clusters):
  """The reference loop in differentiable jnp, for a given (B, heads, L) NumPy sort order: one
  cluster at a time, real tokens only."""
  length = q.shape[2]
  size = -(-length // num_clusters)
  out = jnp.zeros_like(q)
  for b in range(q.shape[0]):
    for h in range(q.shape[1]):
      for c in range(-(-length // size)):
        tokens = order[b, h, c * size:(c + 1) * size]
        weights = jax.nn.softmax(q[b, h, tokens] @ k[b, h, tokens].T, axis=-1)
        out = out.at[b, h, tokens].set(weights @ v[b, h, tokens])
  return out


@pytest.mark.parametrize('length,num_clusters', [(25, 4), (9, 4), (3, 8)])
def test_padded_gradients_are_finite_and_equal_the_loop(length, num_clusters):
  q, k, v = _qkv(batch=1, heads=2, length=length)
  order = np.asarray(sec.semantic_sort_order(k))  # No gradient flows through the order.
  cotangent = jax.random.normal(jax.random.key(7), q.shape)
  functions = (lambda *t: sec.cluster_attention(*t, num_clusters)[0],
               lambda *t: _jnp_loop_cluster_attention(*t, order, num_clusters))
  with jax.default_matmul_precision('highest'):
    grads = [jax.jit(jax.grad(lambda *t, f=f: jnp.sum(f(*t) * cotangent), argnums=(0, 1, 2)))(
        q, k, v) for f in functions]
  for got, want in zip(*grads):
    chex.assert_tree_all_finite(got)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_divisible_counts_run_the_unpadded_code_bit_for_bit():
  """Where n·s == L, the op is the gather, reshape, attention and inverse gather, nothing else."""
  q, k, v = _qkv(length=24)

  def unpadded(q, k, v):
    order = sec.semantic_sort_order(k)
    inverse = sec.inverse_permutation(order)
    shape = q.shape[:2] + (4, 6, q.shape[3])
    permuted = [sec.permute_tokens(t, order, inverse) for t in (q, k, v)]
    out = sec.softmax_attention(*(t.reshape(shape) for t in permuted)).reshape(q.shape)
    return sec.permute_tokens(out, inverse, order), order

  op = lambda q, k, v: sec.cluster_attention(q, k, v, 4)
  assert str(jax.make_jaxpr(op)(q, k, v)) == str(jax.make_jaxpr(unpadded)(q, k, v))
  for got, want in zip(jax.jit(op)(q, k, v), jax.jit(unpadded)(q, k, v)):
    np.testing.assert_array_equal(got, want)


def test_fully_masked_rows_stay_finite_forward_and_backward():
  q, k, v = _qkv(length=6)
  # Query rows 0-1 may see keys 0-3, rows 2-5 no key at all.
  mask = jnp.arange(6)[None, :] < jnp.where(jnp.arange(6) < 2, 4, 0)[:, None]

  def loss(q, k, v):
    return jnp.sum(sec.softmax_attention(q, k, v, key_mask=mask) ** 2)

  out = sec.softmax_attention(q, k, v, key_mask=mask)
  chex.assert_tree_all_finite((out, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))
  with jax.default_matmul_precision('highest'):
    np.testing.assert_allclose(out[..., :2, :], sec.softmax_attention(
        q[..., :2, :], k[..., :4, :], v[..., :4, :]), rtol=1e-6, atol=1e-6)


def test_padded_clusters_in_bfloat16_follow_the_loop():
  q, k, v = (t.astype(jnp.bfloat16) for t in _qkv(length=25))
  # The loop on the same bfloat16 inputs: rounding them may reorder tokens, so not the float32 ones.
  want, want_order = _numpy_cluster_attention(*(t.astype(jnp.float32) for t in (q, k, v)), 4)
  out, order = jax.jit(sec.cluster_attention, static_argnums=3)(q, k, v, 4)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(order, want_order)
  np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=0, atol=0.03)


def test_attention_gradients_equal_the_textbook_softmax():
  """The late normalization and the stop-gradient max leave the gradients unchanged."""
  q, k, v = _qkv(length=12)
  cotangent = jax.random.normal(jax.random.key(7), q.shape)

  def textbook(q, k, v):
    return jax.nn.softmax(jnp.einsum('...qd,...kd->...qk', q, k), axis=-1) @ v

  with jax.default_matmul_precision('highest'):
    grads = [jax.grad(lambda *t, f=f: jnp.sum(f(*t) * cotangent), argnums=(0, 1, 2))(q, k, v)
             for f in (sec.softmax_attention, textbook)]
  for got, want in zip(*grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_native_argsort_equals_jnp_argsort_with_ties_zeros_and_nans():
  values = jax.random.randint(jax.random.key(0), (3, 5, 301), -4, 5).astype(jnp.float32) / 4
  special = jnp.array([0.0, -0.0, jnp.nan, jnp.inf, -jnp.inf, -jnp.nan, 1e-45, -1e-45])
  values = values.at[:, :, :special.size].set(special).at[1, 2].set(jnp.nan)
  got = jax.jit(cpu_kernels.argsort)(values)
  np.testing.assert_array_equal(got, jnp.argsort(values, axis=-1))
  chex.assert_type(got, jnp.int32)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16, jnp.int32])
def test_native_row_gather_equals_take_along_axis(dtype):
  x = jax.random.normal(jax.random.key(0), (3, 2, 37, 5)).astype(dtype) * 10
  index = jnp.argsort(jax.random.normal(jax.random.key(1), (3, 2, 37)), axis=-1)
  got = jax.jit(cpu_kernels.gather_rows)(x, index)
  np.testing.assert_array_equal(got, jnp.take_along_axis(x, index[..., None], axis=2))
  chex.assert_type(got, dtype)
  with pytest.raises(Exception, match=r'an index is out of \[0, L\)'):
    jax.jit(cpu_kernels.gather_rows)(x, index.at[1, 1, 3].set(37))
  with pytest.raises(Exception, match=r'index \(\.\.\., L\)'):
    jax.jit(cpu_kernels.gather_rows)(x, index[..., :-1])


def _xla_attention_from_qkv(tokens, sin, cos, heads, num_clusters):
  """What the model computes from qkv rows (B, L, 3C) without the fused kernel."""
  return sec.xla_attention_from_qkv(tokens, sin, cos, heads, num_clusters, 'einsum')


# (tokens, heads, head dim, clusters): clusters of 12 tokens (padded to a whole vector inside the
# kernel), of 32, full attention over 20 tokens; each supported head dim; pad slots: 52 tokens in
# 5 clusters of 11 (3 pads in the last), 44 tokens in 8 clusters of 6 (the last 2 real tokens and
# 4 pads), 9 tokens in 4 clusters of 3 (3 pads: a whole cluster of pads, not computed).
FUSED_CASES = [(48, 2, 16, 4), (64, 3, 32, 2), (20, 2, 64, -1), (32, 1, 16, 1), (52, 2, 16, 5),
               (44, 1, 32, 8), (9, 2, 16, 4)]


@pytest.mark.parametrize('length,heads,head_dim,num_clusters', FUSED_CASES)
def test_fused_attention_equals_the_xla_path_forward_and_backward(length, heads, head_dim,
                                                                  num_clusters):
  from secvit_jax import model  # pylint: disable=g-import-not-at-top
  tokens = jax.random.normal(jax.random.key(0), (2, length, 3 * heads * head_dim)) * 2
  rows = 4 if length % 4 == 0 else 1
  sin, cos = map(jnp.asarray, model.rope_tables(rows, length // rows, head_dim))
  cotangent = jax.random.normal(jax.random.key(1), (2, length, heads * head_dim))
  assert sec.fused_attention_applies(tokens.shape, heads, num_clusters, 'auto', jnp.float32)

  def output_order_and_gradient(function):
    def loss(tokens):
      out, order = function(tokens, sin, cos, heads, num_clusters)
      return jnp.sum(out * cotangent), (out, order)
    with jax.default_matmul_precision('highest'):
      gradient, (out, order) = jax.jit(jax.grad(loss, has_aux=True))(tokens)
    return out, order, gradient

  fused_out, fused_order, fused_gradient = output_order_and_gradient(sec.fused_cluster_attention)
  out, order, gradient = output_order_and_gradient(_xla_attention_from_qkv)
  np.testing.assert_allclose(fused_out, out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(fused_gradient, gradient, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(gradient[..., :heads * head_dim]).max()) > 0.1  # q's part is not zero.
  if num_clusters > 1:
    np.testing.assert_array_equal(fused_order, order)
  else:
    assert fused_order is None and order is None


def test_native_sort_scores_equal_float64_scores_and_give_the_xla_order():
  from secvit_jax import model  # pylint: disable=g-import-not-at-top
  heads, head_dim, length = 3, 32, 96
  tokens = jax.random.normal(jax.random.key(0), (2, length, 3 * heads * head_dim)) + 0.3
  sin, cos = map(jnp.asarray, model.rope_tables(8, length // 8, head_dim))
  got = jax.jit(lambda t: cpu_kernels.sort_scores(t, sin, cos, heads))(tokens)
  chex.assert_shape(got, (2, heads, length))
  keys = np.asarray(tokens, np.float64)[..., heads * head_dim:2 * heads * head_dim]
  keys = keys.reshape(2, length, heads, head_dim).transpose(0, 2, 1, 3)
  pairs = keys.reshape(*keys.shape[:-1], -1, 2)
  rotated = np.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(keys.shape)
  keys = (keys * np.asarray(cos, np.float64) + rotated * np.asarray(sin, np.float64)) / np.sqrt(
      head_dim)
  center = keys.mean(axis=2, keepdims=True)
  want = np.sum(keys / np.linalg.norm(keys, axis=-1, keepdims=True)
                * center / np.linalg.norm(center, axis=-1, keepdims=True), axis=-1)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)  # float32 products of the inputs.
  xla_keys = sec.apply_rope(tokens[..., heads * head_dim:2 * heads * head_dim].reshape(
      2, length, heads, head_dim).transpose(0, 2, 1, 3), sin, cos) * head_dim**-0.5
  np.testing.assert_array_equal(jnp.argsort(got, axis=-1), sec.semantic_sort_order(xla_keys))
  with pytest.raises(Exception, match=r'sin, cos \(L, d\)'):
    jax.jit(lambda t: cpu_kernels.sort_scores(t, sin[:-1], cos, heads))(tokens)


def test_fused_attention_is_deterministic_and_checks_its_operands():
  tokens = jax.random.normal(jax.random.key(0), (2, 48, 3 * 32))
  sin, cos = (jnp.ones((48, 16)), jnp.zeros((48, 16)))
  order = jnp.argsort(jax.random.normal(jax.random.key(1), (2, 2, 48)), axis=-1)
  run = jax.jit(lambda t: jax.grad(lambda t: jnp.sum(jnp.sin(
      sec.fused_cluster_attention(t, sin, cos, 2, 4)[0])))(t))
  np.testing.assert_array_equal(run(tokens), run(tokens))
  with pytest.raises(Exception, match=r'the cluster size positive'):
    jax.jit(lambda t: cpu_kernels.cluster_attention(t, sin, cos, order, 2, 0))(tokens)
  with pytest.raises(Exception, match=r'order must be \(B, heads, L\)'):
    jax.jit(lambda t: cpu_kernels.cluster_attention(t, sin, cos, order[:, :1], 2, 12))(tokens)
  with pytest.raises(Exception, match=r'sin and cos must be \(L, d\)'):
    jax.jit(lambda t: cpu_kernels.cluster_attention(t, sin[:, :8], cos, order, 2, 12))(tokens)
  with pytest.raises(Exception, match='head dim not 16, 32 or 64'):
    jax.jit(lambda t: cpu_kernels.cluster_attention(t, sin[:, :8], cos[:, :8],
                                                    order[:, :1].repeat(4, 1), 4, 12))(tokens)


def test_fused_attention_applies_only_where_its_kernel_runs(monkeypatch):
  applies = functools.partial(sec.fused_attention_applies, heads=2, num_clusters=32)
  assert applies((8, 3136, 192), impl='auto', dtype=jnp.float32)  # Stage 0 of secvit_t.
  assert applies((8, 49, 1536), heads=16, num_clusters=-1, impl='auto', dtype=jnp.float32)
  assert not applies((8, 3136, 192), impl='einsum', dtype=jnp.float32)  # Chosen explicitly.
  assert not applies((8, 3136, 192), impl='auto', dtype=jnp.bfloat16)
  assert applies((8, 3137, 192), impl='auto', dtype=jnp.float32)  # Pad slots.
  assert applies((2, 16384, 192), num_clusters=168, impl='auto', dtype=jnp.float32)  # 512², T 98.
  assert not applies((8, 3136, 6 * 24), impl='auto', dtype=jnp.float32)  # Head dim 24.
  assert not applies((8, 4096, 192), num_clusters=4, impl='auto', dtype=jnp.float32)  # T 1024.
  monkeypatch.setattr(cpu_kernels, 'use_native', lambda: False)  # Several devices, or no compiler.
  assert not applies((8, 3136, 192), impl='auto', dtype=jnp.float32)


def test_attention_impl_auto_is_einsum_here_and_cudnn_needs_a_gpu():
  assert sec.resolve_attention_impl('auto', jnp.bfloat16) == 'einsum'  # The CPU.
  assert sec.resolve_attention_impl('einsum', jnp.float32) == 'einsum'
  with pytest.raises(ValueError, match="needs a CUDA GPU .* backend is cpu and the dtype float32"):
    sec.resolve_attention_impl('cudnn', jnp.float32)
  with pytest.raises(ValueError, match="attention_impl must be one of .* got 'flash'"):
    sec.resolve_attention_impl('flash', jnp.float32)
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="attention_impl='cudnn' needs a CUDA GPU"):
    sec.cluster_attention(q, k, v, 4, 'cudnn')


def test_cudnn_path_folds_clusters_into_the_batch(monkeypatch):
  """The cuDNN call's layout and scale, checked through XLA's implementation of the same API."""
  calls = []
  reference = jax.nn.dot_product_attention

  def through_xla(*args, implementation=None, **kwargs):
    calls.append((implementation, args[0].shape, kwargs['scale']))
    return reference(*args, implementation='xla', **kwargs)

  monkeypatch.setattr(jax.nn, 'dot_product_attention', through_xla)
  q, k, v = (t.reshape(2, 3, 4, 8, 16) for t in _qkv(batch=2, heads=3, length=32, head_dim=16))
  with jax.default_matmul_precision('highest'):
    np.testing.assert_allclose(sec.softmax_attention(q, k, v, impl='cudnn'),
                               sec.softmax_attention(q, k, v), rtol=1e-5, atol=1e-5)
  assert calls == [('cudnn', (24, 8, 1, 16), 1.0)]


def test_sort_order_ascends_in_cosine_similarity_to_the_mean_key():
  _, k, _ = _qkv()
  order = np.asarray(sec.semantic_sort_order(k))
  center = np.asarray(k).mean(axis=2, keepdims=True)
  cosine = np.sum(np.asarray(k) * center, -1) / (
      np.linalg.norm(np.asarray(k), axis=-1) * np.linalg.norm(center, axis=-1))
  sorted_scores = np.take_along_axis(cosine, order, axis=-1)
  assert np.all(np.diff(sorted_scores, axis=-1) >= -1e-6)


def test_permutation_and_inverse_compose_to_identity():
  x, k, _ = _qkv(length=50)
  order = sec.semantic_sort_order(k)
  inverse = sec.inverse_permutation(order)
  np.testing.assert_array_equal(
      np.take_along_axis(np.asarray(inverse), np.asarray(order), axis=-1),
      np.broadcast_to(np.arange(50), order.shape))
  sorted_x = sec.permute_tokens(x, order, inverse)
  assert not np.array_equal(sorted_x, x)
  np.testing.assert_array_equal(sec.permute_tokens(sorted_x, inverse, order), x)


def test_one_cluster_of_sorted_tokens_equals_full_attention():
  """Sorting, attending over a single cluster and unsorting is full attention."""
  q, k, v = _qkv()
  order = sec.semantic_sort_order(k)
  inverse = sec.inverse_permutation(order)
  with jax.default_matmul_precision('highest'):
    sorted_out = sec.softmax_attention(*(sec.permute_tokens(t, order, inverse) for t in (q, k, v)))
    np.testing.assert_allclose(sec.permute_tokens(sorted_out, inverse, order),
                               sec.softmax_attention(q, k, v), rtol=1e-6, atol=1e-6)
    # And the op itself treats one cluster (or the release's -1) as full attention.
    for clusters in (1, -1):
      out, order = sec.cluster_attention(q, k, v, clusters)
      assert order is None
      np.testing.assert_array_equal(out, sec.softmax_attention(q, k, v))


def test_custom_backward_equals_autodiff_bitwise():
  q, k, v = _qkv(length=48)
  cotangent = jax.random.normal(jax.random.key(7), q.shape)

  def loss(permute, q, k, v):
    order = sec.semantic_sort_order(k)
    inverse = sec.inverse_permutation(order)
    shape = q.shape[:2] + (4, q.shape[2] // 4, q.shape[3])
    clustered = [permute(t, order, inverse).reshape(shape) for t in (q, k, v)]
    out = permute(sec.softmax_attention(*clustered).reshape(q.shape), inverse, order)
    return jnp.sum(out * cotangent)

  def autodiff_permute(x, order, inverse):
    del inverse
    return jnp.take_along_axis(x, order[..., None], axis=2)

  grad = lambda permute: jax.jit(jax.grad(lambda *a: loss(permute, *a), argnums=(0, 1, 2)))
  custom = grad(sec.permute_tokens)(q, k, v)
  reference = grad(autodiff_permute)(q, k, v)
  for got, want in zip(custom, reference):
    np.testing.assert_array_equal(got, want)
  assert all(np.abs(g).sum() > 0 for g in custom)


def _all_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      inner = getattr(param, 'jaxpr', param)
      if hasattr(inner, 'eqns'):
        yield from _all_eqns(inner)


@pytest.mark.parametrize('length', [64, 61])
@pytest.mark.parametrize('native', [False, True])
def test_jaxpr_is_static_and_stays_on_device(native, length, monkeypatch):
  monkeypatch.setattr(cpu_kernels, 'use_native', lambda: native)
  q, k, v = _qkv(batch=4, heads=2, length=length, head_dim=16)

  def forward_and_backward(q, k, v):
    out, vjp = jax.vjp(lambda q, k, v: sec.cluster_attention(q, k, v, 8)[0], q, k, v)
    return out, vjp(out)

  closed = jax.make_jaxpr(forward_and_backward)(q, k, v)
  names = [eqn.params['target_name'] if eqn.primitive.name == 'ffi_call' else eqn.primitive.name
           for eqn in _all_eqns(closed.jaxpr)]
  sort, gather = ('secvit_argsort', 'secvit_gather_rows') if native else ('sort', 'gather')
  # Four permutations forward (q, k, v in, the output back), four backward.
  assert names.count(gather) == 8, names
  host_or_dynamic = {p for p in names
                     if 'callback' in p or p in ('while', 'cond', 'infeed', 'outfeed')}
  assert not host_or_dynamic, host_or_dynamic
  # Only one sort: the inverse permutation is a scatter of positions, not a second argsort.
  assert names.count(sort) == 1 and ('sort' not in names if native else True)
  assert native or 'ffi_call' not in names
  for eqn in _all_eqns(closed.jaxpr):
    for var in eqn.outvars:
      assert all(isinstance(dim, int) for dim in var.aval.shape), eqn
    if eqn.primitive.name == 'sort' or eqn.params.get('target_name') == 'secvit_argsort':
      # Only the real tokens' scores are sorted.
      assert eqn.invars[0].aval.shape == (4, 2, length), eqn


_SHARDED_CHECK = """
import jax, numpy as np
from secvit_jax import sec
from tests.test_sec import _numpy_cluster_attention, _qkv
assert len(jax.devices()) == 4
mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
for length in (24, 25):  # Divisible, and padded to 28.
  q, k, v = (jax.device_put(t, sharding) for t in _qkv(batch=8, length=length))
  out, order = jax.jit(sec.cluster_attention, static_argnums=3)(q, k, v, 4)
  assert out.sharding.is_equivalent_to(sharding, out.ndim), out.sharding
  assert order.sharding.is_equivalent_to(sharding, order.ndim), order.sharding
  want_out, want_order = _numpy_cluster_attention(q, k, v, 4)
  with jax.default_matmul_precision('highest'):
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(order, want_order)
print('ok')
"""


def test_shards_on_the_batch_axis():
  """Under jit with the batch sharded over 4 simulated devices the op keeps the layout."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', _SHARDED_CHECK], env=env, capture_output=True,
                          text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr
