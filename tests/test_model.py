"""SecViT against the release: golden fixture through the converter, parameter counts, shapes."""

import os
import subprocess
import sys
import textwrap

import chex
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import secvit_jax
from secvit_jax import convert
from secvit_jax import cpu_kernels
from secvit_jax import model as model_lib
from tests import conftest

# secvit_t's cluster counts (32, 8, 2, global) in a model that compiles in seconds.
TINY = dict(embed_dims=(16, 32, 32, 32), depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2))

RELEASE_PARAM_COUNTS = {
    'secvit_t': 14_981_800, 'secvit_s': 26_776_104,
    'secvit_b': 54_682_776, 'secvit_l': 96_495_096,
}


@pytest.fixture(scope='module')
def converted_variables(golden_model, tmp_path_factory):
  """The fixture's release checkpoint, converted to orbax with the CLI's code and read back."""
  variables = {}
  for ema in (False, True):
    directory = tmp_path_factory.mktemp('converted') / ('ema' if ema else 'model')
    convert.convert_checkpoint(conftest.GOLDEN_PTH, str(directory), model=golden_model, ema=ema)
    variables[ema] = secvit_jax.load_variables(str(directory))
  return variables


def _nhwc(array):
  return jnp.asarray(array).transpose(0, 2, 3, 1)


@pytest.mark.parametrize('name', ['square', 'wide'])
def test_golden_fixture_logits_stages_and_sort_order(name, golden, golden_model,
                                                     converted_variables):
  images = _nhwc(golden[f'{name}/input_nchw'])
  apply = jax.jit(lambda v, x: golden_model.apply(v, x, train=False, mutable=['intermediates']))
  with jax.default_matmul_precision('highest'):
    logits, state = apply(converted_variables[False], images)
  np.testing.assert_allclose(logits, golden[f'{name}/logits'], rtol=0, atol=1e-4)
  intermediates = state['intermediates']
  for stage in range(4):
    np.testing.assert_allclose(intermediates[f'stage{stage}'][0],
                               _nhwc(golden[f'{name}/stage{stage}_nchw']), rtol=0, atol=1e-4,
                               err_msg=f'stage {stage}')
  sort_order = intermediates['stage_0']['block_0']['attn']['sort_order'][0]
  np.testing.assert_array_equal(sort_order, golden[f'{name}/block0_sort_indices'])


def test_ema_weights_are_converted_from_model_ema(golden_state_dict, converted_variables):
  import torch  # pylint: disable=g-import-not-at-top
  checkpoint = torch.load(conftest.GOLDEN_PTH, weights_only=False)
  model, ema = converted_variables[False], converted_variables[True]
  # A depthwise kernel, a 1×1 conv, a layer scale and BatchNorm statistics, each from model_ema.
  cases = [
      (('params', 'stage_0', 'block_0', 'attn', 'lepe', 'kernel'),
       'layers.0.blocks.0.attn.lepe.weight', lambda w: w.transpose(2, 3, 1, 0)),
      (('params', 'stage_1', 'block_1', 'ffn', 'fc1', 'kernel'),
       'layers.1.blocks.1.ffn.fc1.weight', lambda w: w[:, :, 0, 0].T),
      (('params', 'stage_2', 'block_0', 'gamma_1'), 'layers.2.blocks.0.gamma_1',
       lambda w: w.reshape(-1)),
      (('batch_stats', 'norm', 'var'), 'norm.running_var', lambda w: w),
  ]
  for path, key, relayout in cases:
    leaf_ema, leaf_model = ema, model
    for name in path:
      leaf_ema, leaf_model = leaf_ema[name], leaf_model[name]
    np.testing.assert_array_equal(leaf_ema, relayout(checkpoint['model_ema'][key].numpy()))
    np.testing.assert_array_equal(leaf_model, relayout(golden_state_dict[key]))
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(model), jax.tree.leaves(ema)))


@pytest.mark.parametrize('name', sorted(RELEASE_PARAM_COUNTS))
def test_parameter_counts_equal_the_release(name):
  model = secvit_jax.create_model(name)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False))
  assert sum(leaf.size for leaf in jax.tree.leaves(shapes['params'])) == (
      RELEASE_PARAM_COUNTS[name])
  logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 224, 224, 3))), shapes)
  chex.assert_shape(logits, (2, 1000))
  assert logits.dtype == jnp.float32


@pytest.mark.parametrize('name', sorted(RELEASE_PARAM_COUNTS))
def test_every_release_key_maps_to_a_leaf_of_the_same_size(name):
  """The converter's key mapping covers each released variant's state dict (testdata lists)."""
  listing = {}
  with open(f'{conftest.TESTDATA}/state_dict_{name}.txt') as f:
    for line in f:
      if not line.startswith('#'):
        key, _, shape = line.rstrip('\n').split('\t')
        listing[key] = tuple(int(d) for d in shape.strip('()').split(',') if d.strip())
  mapped = {key: shape for key, (_, _, shape) in
            convert.release_layout(secvit_jax.create_model(name)).items()}
  ignored = {k for k in listing if k.endswith(('num_batches_tracked', 'RoPE.angle'))}
  assert set(mapped) == set(listing) - ignored
  for key, shape in mapped.items():
    assert np.prod(shape) == np.prod(listing[key]), key


def test_other_input_sizes_follow_the_rope_tables(golden_model, converted_variables):
  images = jnp.ones((1, 96, 32, 3))  # Stage 0: 24×8 = 192 tokens in 4 clusters.
  logits = jax.jit(lambda v, x: golden_model.apply(v, x))(converted_variables[False], images)
  chex.assert_shape(logits, (1, 10))
  chex.assert_tree_all_finite(logits)


def test_any_input_size_pads_the_clusters(golden_model, converted_variables, monkeypatch):
  """60×60: stage 0 has 15×15 = 225 tokens in 4 clusters of 57 (3 pad slots); 72×40: stage 1 has
  9×5 = 45 tokens in 2 clusters of 23 (1 pad slot). The same with and without native kernels."""
  for size, stage, tokens, slots in (((60, 60), 0, 225, 228), ((72, 40), 1, 45, 46)):
    images = jax.random.normal(jax.random.key(0), (2, *size, 3))
    results = []
    for native in (False, True):
      monkeypatch.setattr(cpu_kernels, 'use_native', lambda native=native: native)
      with jax.default_matmul_precision('highest'):
        results.append(jax.jit(lambda v, x: golden_model.apply(v, x, mutable=['intermediates']))(
            converted_variables[False], images))
    (logits, state), (native_logits, native_state) = results
    chex.assert_tree_all_finite(logits)
    np.testing.assert_allclose(native_logits, logits, rtol=1e-5, atol=1e-5)
    sort_orders = lambda state: {k: v for k, v in traverse_util.flatten_dict(
        state['intermediates'], sep='/').items() if 'sort_order' in k}
    chex.assert_trees_all_equal(sort_orders(native_state), sort_orders(state))
    order = np.asarray(state['intermediates'][f'stage_{stage}']['block_0']['attn']['sort_order'][0])
    chex.assert_shape(order, (2, golden_model.num_heads[stage], slots))
    real, pads = order[..., :tokens], order[..., tokens:]
    np.testing.assert_array_equal(np.sort(real, axis=-1),
                                  np.broadcast_to(np.arange(tokens), real.shape))
    np.testing.assert_array_equal(pads, np.broadcast_to(np.arange(tokens, slots), pads.shape))


def random_variables(model, images, seed=0):
  """Variables of `model` for `images` with random values, without compiling `model.init`."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)
  rng = np.random.default_rng(seed)
  def leaf(path, shape):
    if path[-1].key == 'var':
      return rng.uniform(0.5, 1.5, shape.shape).astype(shape.dtype)
    return (0.2 * rng.standard_normal(shape.shape)).astype(shape.dtype)
  return jax.tree_util.tree_map_with_path(leaf, shapes)


def test_fewer_tokens_than_clusters_trains_with_finite_gradients():
  """12×12 gives stages of 3×3, 2×2 and 1×1 tokens for 32, 8 and 2 clusters: whole clusters of
  padding. The loss and every gradient stay finite, and remat gives the same gradients."""
  model = secvit_jax.create_model('secvit_t', num_classes=3, projection=32, **TINY)
  images = jax.random.normal(jax.random.key(0), (2, 12, 12, 3))
  variables = random_variables(model, images)

  def grads(model, params):
    def loss(params):
      logits, _ = model.apply({**variables, 'params': params}, images, train=True,
                              rngs={'dropout': jax.random.key(2)}, mutable=['batch_stats'])
      return jnp.sum(logits ** 2)
    return jax.value_and_grad(loss)(params)

  plain, remat = jax.jit(lambda p: (grads(model, p), grads(model.clone(remat=True), p)))(
      variables['params'])
  chex.assert_tree_all_finite((plain, remat))
  assert np.abs(plain[1]['stage_0']['block_0']['attn']['qkv']['kernel']).sum() > 0
  chex.assert_trees_all_close(remat, plain, rtol=1e-5, atol=1e-6)


def test_bfloat16_at_a_padded_size_stays_close_to_float32(golden_model, converted_variables):
  images = jax.random.normal(jax.random.key(0), (2, 60, 60, 3))
  logits = {dtype: np.asarray(jax.jit(lambda v, m=golden_model.clone(dtype=dtype): m.apply(
      v, images))(converted_variables[False])) for dtype in (jnp.float32, jnp.bfloat16)}
  error = np.linalg.norm(logits[jnp.bfloat16] - logits[jnp.float32])
  assert error / np.linalg.norm(logits[jnp.float32]) < 0.08


def test_tokens_per_cluster_sets_the_cluster_counts(monkeypatch):
  model = secvit_jax.create_model('secvit_s', tokens_per_cluster=(98, 98, 98, 0))
  assert model.clusters_per_stage(224, 224) == (32, 8, 2, -1)  # The release's counts.
  # 128², 64², 32² tokens: ceil(16384 / 98) = 168, ceil(4096 / 98) = 42, ceil(1024 / 98) = 11.
  assert model.clusters_per_stage(512, 512) == (168, 42, 11, -1)
  assert model.clusters_per_stage(800, 1344) == (686, 172, 43, -1)
  assert secvit_jax.create_model('secvit_s').clusters_per_stage(800, 1344) == (32, 8, 2, -1)
  assert model_lib.stage_resolutions(232, 200) == ((58, 50), (29, 25), (15, 13), (8, 7))
  # And the blocks cluster with these counts: 232×200 gives 2900, 725, 195 and 56 tokens.
  used = []
  attention = model_lib.sec.cluster_attention
  monkeypatch.setattr(model_lib.sec, 'cluster_attention',
                      lambda q, k, v, n, *rest: used.append((q.shape[2], n))
                      or attention(q, k, v, n, *rest))
  fused = model_lib.sec.fused_cluster_attention  # The CPU kernel's path, where it applies.
  monkeypatch.setattr(model_lib.sec, 'fused_cluster_attention',
                      lambda tokens, sin, cos, heads, n: used.append((tokens.shape[1], n))
                      or fused(tokens, sin, cos, heads, n))
  reduced = model.clone(depths=(1, 1, 1, 1))
  jax.eval_shape(lambda: reduced.init(jax.random.key(0), jnp.zeros((1, 232, 200, 3))))
  assert used == [(2900, 30), (725, 8), (195, 2), (56, -1)]
  with pytest.raises(ValueError, match=r'one entry per stage \(4\)'):
    secvit_jax.create_model('secvit_s', tokens_per_cluster=(98, 98))
  with pytest.raises(ValueError, match='got -98'):
    model.clone(tokens_per_cluster=(-98, 0, 0, 0)).clusters_per_stage(224, 224)


def test_train_mode_updates_batch_stats_and_drops_paths(golden_model, converted_variables):
  model = golden_model.clone(drop_path_rate=0.5)
  images = _nhwc(golden_model_inputs := np.random.default_rng(0).normal(size=(4, 3, 64, 64)))
  del golden_model_inputs

  @jax.jit
  def train_apply(variables, key):
    return model.apply(variables, images, train=True, rngs={'dropout': key},
                       mutable=['batch_stats'])

  logits_a, updates = train_apply(converted_variables[False], jax.random.key(0))
  logits_b, _ = train_apply(converted_variables[False], jax.random.key(1))
  chex.assert_shape(logits_a, (4, 10))
  assert not np.allclose(logits_a, logits_b)  # Different stochastic depth masks.
  old_mean = converted_variables[False]['batch_stats']['stem']['bn_0']['mean']
  new_mean = updates['batch_stats']['stem']['bn_0']['mean']
  chex.assert_trees_all_equal_shapes(updates['batch_stats'],
                                     converted_variables[False]['batch_stats'])
  assert not np.allclose(old_mean, new_mean)


@pytest.mark.parametrize('name', ['square', 'wide'])
def test_bfloat16_compute_stays_close_to_float32(name, golden, golden_model, converted_variables):
  images = _nhwc(golden[f'{name}/input_nchw'])
  bf16_model = golden_model.clone(dtype=jnp.bfloat16)
  logits32 = np.asarray(
      jax.jit(lambda v: golden_model.apply(v, images))(converted_variables[False]))
  logits16 = jax.jit(lambda v: bf16_model.apply(v, images))(converted_variables[False])
  assert logits16.dtype == jnp.float32
  logits16 = np.asarray(logits16)
  # Measured: 4.3% and 2.5% relative L2 error on the fixture's randomized weights and statistics.
  assert np.linalg.norm(logits16 - logits32) / np.linalg.norm(logits32) < 0.08
  # Top-1 agrees wherever float32's top-2 margin is larger than the bfloat16 error.
  top2 = np.sort(logits32, axis=-1)[:, -2:]
  clear = (top2[:, 1] - top2[:, 0]) > 2 * np.abs(logits16 - logits32).max()
  np.testing.assert_array_equal(np.argmax(logits16, -1)[clear], np.argmax(logits32, -1)[clear])


def test_dense_matches_flax_dense_with_its_gradients():
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 6))
  cotangent = jax.random.normal(jax.random.key(1), (2, 5, 3, 4))
  ours = model_lib.Dense(4)
  params = ours.init(jax.random.key(2), x)
  flax_dense = model_lib.nn.Dense(4)
  assert jax.tree.map(jnp.shape, flax_dense.init(jax.random.key(2), x)) == jax.tree.map(
      jnp.shape, params)
  grads = [jax.jit(jax.grad(lambda p, x, m=m: jnp.sum(m.apply(p, x) * cotangent),
                            argnums=(0, 1)))(params, x) for m in (ours, flax_dense)]
  with jax.default_matmul_precision('highest'):
    np.testing.assert_allclose(ours.apply(params, x), flax_dense.apply(params, x), rtol=1e-6,
                               atol=1e-6)
    chex.assert_trees_all_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('channels', [64, 40])  # The native kernels; flax's formula in XLA.
def test_native_layer_norm_matches_flax_with_its_gradients(channels):
  x = jax.random.normal(jax.random.key(0), (2, 7, 3, channels)) * 3 + 1
  cotangent = jax.random.normal(jax.random.key(1), x.shape)
  ours = model_lib.NativeLayerNorm()
  flax_norm = model_lib.nn.LayerNorm(epsilon=1e-6, use_fast_variance=False)
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(2), p.shape),
                        ours.init(jax.random.key(3), x))
  assert jax.tree.map(jnp.shape, flax_norm.init(jax.random.key(3), x)) == jax.tree.map(
      jnp.shape, params)
  grads = [jax.jit(jax.grad(lambda p, x, m=m: jnp.sum(m.apply(p, x) * cotangent),
                            argnums=(0, 1)))(params, x) for m in (ours, flax_norm)]
  np.testing.assert_allclose(ours.apply(params, x), flax_norm.apply(params, x), rtol=1e-5,
                             atol=1e-5)
  chex.assert_trees_all_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)
  assert isinstance(model_lib.layer_norm(jnp.float32, 'norm'), model_lib.NativeLayerNorm)
  assert isinstance(model_lib.layer_norm(jnp.bfloat16, 'norm'), model_lib.nn.LayerNorm)


def test_native_layer_norm_kernels_are_deterministic_and_check_shapes():
  x = jax.random.normal(jax.random.key(0), (300, 48))
  scale, bias = jnp.ones(48), jnp.zeros(48)
  y, mean, rstd = jax.jit(model_lib.cpu_kernels.layer_norm, static_argnums=3)(x, scale, bias, 1e-6)
  grads = [jax.jit(model_lib.cpu_kernels.layer_norm_grad)(x, scale, mean, rstd, y * 2 + 1)
           for _ in range(2)]
  chex.assert_trees_all_equal(grads[0], grads[1])
  with pytest.raises(Exception, match='C a multiple of 16'):
    jax.jit(model_lib.cpu_kernels.layer_norm, static_argnums=3)(x[:, :40], scale[:40],
                                                                 bias[:40], 1e-6)


@pytest.mark.parametrize('impl', ['shift', 'native'])
@pytest.mark.parametrize('channels', [5, 16, 32])  # Native: generic loop; 5×5, 3×3 in registers.
def test_depthwise_conv_matches_xla_conv(impl, channels):
  x = jax.random.normal(jax.random.key(0), (2, 9, 7, channels))
  for size in (3, 5):
    kernel = jax.random.normal(jax.random.key(size), (size, size, 1, channels))
    with jax.default_matmul_precision('highest'):
      np.testing.assert_allclose(model_lib.depthwise_conv(x, kernel, impl),
                                 model_lib.depthwise_conv(x, kernel, 'xla'), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('impl', ['shift', 'native'])
def test_depthwise_conv_backward_matches_xla_conv_gradients(impl):
  # Odd sizes and a width below the kernel size reach every clipped edge of the loops; 16 and 64
  # channels the native kernels' register paths.
  for shape in ((3, 10, 6, 4), (2, 3, 2, 17), (2, 5, 3, 16), (1, 4, 2, 64)):
    x = jax.random.normal(jax.random.key(0), shape)
    cotangent = jax.random.normal(jax.random.key(1), x.shape)
    for size in (3, 5):
      kernel = jax.random.normal(jax.random.key(size), (size, size, 1, shape[-1]))
      grads = {
          name: jax.jit(jax.grad(lambda x, k, name=name: jnp.sum(
              model_lib.depthwise_conv(x, k, name) * cotangent), argnums=(0, 1)))(x, kernel)
          for name in (impl, 'xla')}
      with jax.default_matmul_precision('highest'):
        for got, want in zip(grads[impl], grads['xla']):
          np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_native_depthwise_kernels_are_deterministic_and_check_shapes():
  x = jax.random.normal(jax.random.key(0), (4, 33, 20, 24))
  cotangent = jax.random.normal(jax.random.key(1), x.shape)
  grad = jax.jit(cpu_kernels.kernel_grad, static_argnums=2)
  np.testing.assert_array_equal(grad(x, cotangent, 3), grad(x, cotangent, 3))
  with pytest.raises(Exception, match='cotangent and x differ in shape'):
    grad(x, cotangent[:, 1:], 3)
  with pytest.raises(Exception, match=r'taps must be \(k, k, C\)'):
    jax.jit(cpu_kernels.shifted_sum)(x, jnp.ones((3, 3, 5)))


@pytest.mark.parametrize('stride', [1, 2])
def test_conv3x3_gradients_match_flax_conv_with_the_native_kernel_gradient(stride):
  """Conv3x3 has nn.Conv's parameters, forward pass (bit for bit) and gradients; with stride 2,
  odd sizes, a width of 1 and 3 input channels reach every clipped edge of the native loops."""
  for shape, features in (((2, 9, 7, 3), 32), ((3, 1, 5, 8), 64), ((1, 4, 1, 16), 32)):
    x = jax.random.normal(jax.random.key(0), shape)
    ours = model_lib.Conv3x3(features, stride)
    flax_conv = model_lib.nn.Conv(features, (3, 3), strides=stride, padding=((1, 1), (1, 1)))
    params = ours.init(jax.random.key(1), x)
    params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(2), p.shape), params)
    assert jax.tree.map(jnp.shape, flax_conv.init(jax.random.key(1), x)) == jax.tree.map(
        jnp.shape, params)
    out = ours.apply(params, x)
    np.testing.assert_array_equal(out, flax_conv.apply(params, x))
    cotangent = jax.random.normal(jax.random.key(3), out.shape)
    grads = [jax.jit(jax.grad(lambda p, x, m=m: jnp.sum(m.apply(p, x) * cotangent),
                              argnums=(0, 1)))(params, x) for m in (ours, flax_conv)]
    with jax.default_matmul_precision('highest'):
      chex.assert_trees_all_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


def test_native_conv_kernel_grad_is_used_deterministic_and_checks_shapes():
  x = jax.random.normal(jax.random.key(0), (4, 16, 12, 8))
  cotangent = jax.random.normal(jax.random.key(1), (4, 8, 6, 32))
  grad = jax.jit(cpu_kernels.conv_kernel_grad, static_argnums=(2, 3))
  np.testing.assert_array_equal(grad(x, cotangent, 3, 2), grad(x, cotangent, 3, 2))
  with pytest.raises(Exception, match='shapes of x, cotangent and dw disagree'):
    grad(x, cotangent, 3, 1)
  with pytest.raises(Exception, match='not a multiple of 32'):
    grad(x, cotangent[..., :16], 3, 2)
  conv = model_lib.Conv3x3(32, 2)
  params = conv.init(jax.random.key(2), x)
  step = jax.jit(jax.grad(lambda p: jnp.sum(conv.apply(p, x) * cotangent)))
  assert 'secvit_conv_kernel_grad' in step.lower(params).as_text()


def test_depthwise_conv_names_a_bad_impl():
  with pytest.raises(ValueError, match="got 'fast'"):
    model_lib.depthwise_conv(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 1, 2)), 'fast')


def test_without_a_compiler_the_model_falls_back_to_xla(tmp_path):
  script = textwrap.dedent("""
      import warnings
      import jax, jax.numpy as jnp
      from secvit_jax import cpu_kernels, model
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        assert not cpu_kernels.available()
      assert 'no compiler' in str(caught[0].message) and '$CXX' in str(caught[0].message), caught
      x, k = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 1, 2))
      assert float(model.depthwise_conv(x, k)[0, 1, 1, 0]) == 9.0
  """)
  env = dict(os.environ, CXX=str(tmp_path / 'no-such-compiler'), SECVIT_JAX_CACHE=str(tmp_path),
             JAX_PLATFORMS='cpu')
  repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, '-c', script], env=env, check=True, cwd=repo_root, timeout=300)


def test_rope_angle_is_the_release_buffer(golden):
  for stage, head_dim in enumerate((16, 16, 24, 16)):
    np.testing.assert_allclose(model_lib.rope_angle(head_dim),
                               golden[f'param/layers.{stage}.RoPE.angle'], rtol=1e-6)


def test_unknown_variant_or_field_is_named():
  with pytest.raises(ValueError, match="'secvit_xl'"):
    secvit_jax.create_model('secvit_xl')
  with pytest.raises(ValueError, match='depth'):
    secvit_jax.create_model('secvit_t', depth=(1, 1, 1, 1))
