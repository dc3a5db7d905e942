"""The backbone: multi-scale outputs at any size, the classifier's parameter layout, loading."""

import dataclasses
import os
import subprocess
import sys

import chex
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import secvit_jax
from secvit_jax import convert
from secvit_jax import model as model_lib
from tests import conftest

FEATURE_INFO = {
    'secvit_t': ((64, 4), (128, 8), (256, 16), (512, 32)),
    'secvit_s': ((64, 4), (128, 8), (256, 16), (512, 32)),
    'secvit_b': ((80, 4), (160, 8), (320, 16), (512, 32)),
    'secvit_l': ((112, 4), (224, 8), (448, 16), (640, 32)),
}
# Trainable parameters of the backbone without its output norms (the counts of mmseg/mmdet's
# SecViT/RMT backbones).
BACKBONE_PARAMS = {'secvit_t': 13_429_440, 'secvit_s': 25_223_744}


def _abstract_init(model, size=(224, 224)):
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *size, 3)))


def _trunk(variables):
  """{collection: {stem/..., stage_i/...: shape}} of a model's variables."""
  return {collection: {path: leaf.shape for path, leaf in
                       traverse_util.flatten_dict(tree, sep='/').items()
                       if path.startswith(('stem/', 'stage_'))}
          for collection, tree in variables.items()}


def _backbone_like(classifier, **fields):
  """The backbone with `classifier`'s stem and stages (a reduced configuration, say)."""
  shared = {f.name: getattr(classifier, f.name) for f in dataclasses.fields(model_lib.SecViTStages)
            if f.name not in ('parent', 'name')}
  return model_lib.SecViTBackbone(**shared, **fields)


@pytest.mark.parametrize('name', sorted(FEATURE_INFO))
def test_outputs_follow_feature_info_at_any_size(name):
  assert secvit_jax.create_backbone(name).feature_info == FEATURE_INFO[name]
  backbone = secvit_jax.create_backbone(name, depths=(1, 1, 1, 1))  # Depth changes no shape.
  variables = _abstract_init(backbone)
  # Even, odd, narrow, fewer tokens than clusters, and a COCO-sized input.
  for height, width in ((224, 224), (232, 200), (97, 61), (12, 12), (800, 1344)):
    outputs = jax.eval_shape(lambda v, h=height, w=width: backbone.apply(
        v, jnp.zeros((2, h, w, 3))), variables)
    assert len(outputs) == 4
    for i, (output, (channels, stride)) in enumerate(zip(outputs, backbone.feature_info)):
      rows, cols = -(-height // stride), -(-width // stride)
      chex.assert_shape(output, (2, rows, cols, channels))
      assert (rows, cols) == model_lib.stage_resolutions(height, width)[i]
      assert output.dtype == jnp.float32


@pytest.mark.parametrize('name', sorted(FEATURE_INFO))
def test_stem_and_stages_have_the_classifiers_paths_and_shapes(name):
  # Full depth where the parameter count is known, one block per stage elsewhere.
  overrides = {} if name in BACKBONE_PARAMS else {'depths': (1, 1, 2, 1)}
  backbone_variables = _abstract_init(secvit_jax.create_backbone(name, **overrides))
  classifier_variables = _abstract_init(secvit_jax.create_model(name, **overrides))
def test_builds_only_the_stages_it_needs():
  backbone = secvit_jax.create_backbone('secvit_s', out_indices=(1, 2))
  assert backbone.feature_info == ((128, 8), (256, 16))
  variables = _abstract_init(backbone)
  assert sorted(variables['params']) == ['out_norm_1', 'out_norm_2', 'stage_0', 'stage_1',
                                         'stage_2', 'stem']
  assert 'downsample' in variables['params']['stage_1']
  assert 'downsample' not in variables['params']['stage_2']
  assert 'stage_2' not in variables['batch_stats']  # Its only BatchNorm was the downsample's.
  outputs = jax.eval_shape(lambda v: backbone.apply(v, jnp.zeros((1, 232, 200, 3))), variables)
  chex.assert_shape(outputs, [(1, 29, 25, 128), (1, 15, 13, 256)])
  unnormed = secvit_jax.create_backbone('secvit_s', out_indices=(3,), output_norm=False)
  assert sorted(_abstract_init(unnormed)['params']) == ['stage_0', 'stage_1', 'stage_2',
                                                       'stage_3', 'stem']


def test_overrides_take_every_field_and_bad_arguments_are_named():
  backbone = secvit_jax.create_backbone(
      'secvit_b', tokens_per_cluster=(98, 98, 98, 0), drop_path_rate=0.2, dtype=jnp.bfloat16,
      remat=True, dwconv_impl='xla', depths=(1, 1, 2, 1))
  assert (backbone.tokens_per_cluster, backbone.drop_path_rate, backbone.dtype, backbone.remat,
          backbone.dwconv_impl, backbone.depths) == (
              (98, 98, 98, 0), 0.2, jnp.bfloat16, True, 'xla', (1, 1, 2, 1))
  assert backbone.embed_dims == (80, 160, 320, 512)  # The rest is the variant's.
  assert secvit_jax.create_backbone('secvit_b').drop_path_rate == 0.4
  outputs = jax.eval_shape(lambda v: backbone.apply(v, jnp.zeros((1, 64, 64, 3))),
                           _abstract_init(backbone, (64, 64)))
  assert all(output.dtype == jnp.bfloat16 for output in outputs)
  with pytest.raises(ValueError, match=r"no classification head: drop \['num_classes'\]"):
    secvit_jax.create_backbone('secvit_t', num_classes=10)
  with pytest.raises(ValueError, match=r"unknown SecViTBackbone field\(s\) \['depth'\]"):
    secvit_jax.create_backbone('secvit_t', depth=(1, 1, 1, 1))
  with pytest.raises(ValueError, match="'secvit_m'"):
    secvit_jax.create_backbone('secvit_m')
  for indices in ((), (2, 1), (0, 0), (4,), (-1,)):
    with pytest.raises(ValueError, match=r'out_indices must be increasing stage indices in 0\.\.3'):
      secvit_jax.create_backbone('secvit_t', out_indices=indices)


@pytest.fixture(scope='module')
def golden_classifier(golden_model, tmp_path_factory):
  """The golden fixture's release checkpoint, converted and read back as host NumPy."""
  directory = tmp_path_factory.mktemp('converted') / 'model'
  convert.convert_checkpoint(conftest.GOLDEN_PTH, str(directory), model=golden_model)
  return secvit_jax.load_variables(str(directory))


def _nhwc(array):
  return jnp.asarray(array).transpose(0, 2, 3, 1)


def test_a_loaded_classifier_gives_the_release_stage_outputs(golden, golden_model,
                                                              golden_classifier):
  """Before the downsamples, the stage outputs equal the release's stage outputs taken through
  the classifier's downsample (and the last stage, which has none, equals the release's)."""
  backbone = _backbone_like(golden_model, output_norm=False)
  variables, report = secvit_jax.load_classifier_into_backbone(_abstract_init(backbone, (64, 64)),
                                                               golden_classifier)
  assert report.initialized == ()
  assert {path.split('/')[1] for path in report.left_out} == {'proj', 'norm', 'head'}
  assert len(report.loaded) + len(report.left_out) == len(jax.tree.leaves(golden_classifier))
  chex.assert_trees_all_equal(_trunk(variables), _trunk(golden_classifier))
  images = _nhwc(golden['square/input_nchw'])
  with jax.default_matmul_precision('highest'):
    outputs = jax.jit(backbone.apply)(variables, images)
    for stage, features in enumerate(outputs):
      if stage < 3:
        downsample = model_lib.Downsample(golden_model.embed_dims[stage + 1])
        stage_variables = {collection: golden_classifier[collection][f'stage_{stage}']['downsample']
                           for collection in ('params', 'batch_stats')}
        features = jax.jit(lambda v, x, d=downsample: d.apply(v, x, train=False))(
            stage_variables, features)
      np.testing.assert_allclose(features, _nhwc(golden[f'square/stage{stage}_nchw']), rtol=0,
                                 atol=1e-4, err_msg=f'stage {stage}')


def test_loading_names_what_it_left_out_and_left_initialized(golden, golden_model,
                                                              golden_classifier):
  backbone = _backbone_like(golden_model, out_indices=(0, 2))
  target = _abstract_init(backbone, (64, 64))
  variables, report = secvit_jax.load_classifier_into_backbone(target, golden_classifier)
  assert str(report) == (
      f'loaded {len(report.loaded)} arrays; left out of the classifier: '
      'head, norm, proj, stage_2/downsample, stage_3; kept as initialized: out_norm_0, out_norm_2')
  assert set(report.initialized) == {f'params/out_norm_{i}/{leaf}' for i in (0, 2)
                                     for leaf in ('scale', 'bias')}
  # What it did not load stays as it was: here ShapeDtypeStructs for the caller to initialize.
  assert isinstance(variables['params']['out_norm_0']['scale'], jax.ShapeDtypeStruct)
  leaf = variables['params']['stage_1']['block_0']['ffn']['fc1']['kernel']
  assert isinstance(leaf, np.ndarray)
  np.testing.assert_array_equal(
      leaf, golden_classifier['params']['stage_1']['block_0']['ffn']['fc1']['kernel'])
  # With the output norms as initialized (scale 1, bias 0), each output is the normalized stage.
  variables['params'].update({f'out_norm_{i}': {'scale': np.ones(c, np.float32),
                                                'bias': np.zeros(c, np.float32)}
                              for i, (c, _) in zip((0, 2), backbone.feature_info)})
  images = _nhwc(golden['wide/input_nchw'])
  with jax.default_matmul_precision('highest'):
    normed = jax.jit(backbone.apply)(variables, images)
    plain = jax.jit(backbone.clone(output_norm=False).apply)(
        {c: {k: v for k, v in tree.items() if not k.startswith('out_norm')}
         for c, tree in variables.items()}, images)
  for got, features in zip(normed, plain):
    mean = features.mean(-1, keepdims=True)
    want = (features - mean) / np.sqrt(((features - mean) ** 2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


class _Segmenter(nn.Module):
  """A dense model that nests the backbone, as the segmentation and detection heads will."""
  backbone: model_lib.SecViTBackbone

  @nn.compact
  def __call__(self, images):
    return nn.Dense(3, name='decode_head')(self.backbone(images)[-1])


def test_fills_a_nested_backbone_subtree(golden_model, golden_classifier):
  segmenter = _Segmenter(_backbone_like(golden_model, name='backbone'))
  target = _abstract_init(segmenter, (64, 64))
  variables, report = secvit_jax.load_classifier_into_backbone(target, golden_classifier,
                                                               at='backbone')
  assert str(report).endswith('kept as initialized: backbone/out_norm_0, backbone/out_norm_1, '
                              'backbone/out_norm_2, backbone/out_norm_3, decode_head')
  assert all(path.startswith(('params/backbone/', 'batch_stats/backbone/'))
             for path in report.loaded)
  np.testing.assert_array_equal(variables['batch_stats']['backbone']['stem']['bn_2']['var'],
                                golden_classifier['batch_stats']['stem']['bn_2']['var'])
  assert isinstance(variables['params']['decode_head']['kernel'], jax.ShapeDtypeStruct)
  with pytest.raises(ValueError, match="no 'encoder' in any collection"):
    secvit_jax.load_classifier_into_backbone(target, golden_classifier, at='encoder')


def test_a_shape_or_structure_mismatch_is_an_error_naming_the_entries(golden_model,
                                                                      golden_classifier):
  target = _abstract_init(_backbone_like(golden_model), (64, 64))
  wrong = jax.tree.map(lambda x: x, golden_classifier)
  wrong['params']['stage_1']['block_1']['attn']['qkv']['kernel'] = np.zeros((64, 96), np.float32)
  with pytest.raises(ValueError, match=(
      r'params/stage_1/block_1/attn/qkv/kernel has shape \(64, 96\) in the classifier, '
      r'\(64, 192\) in the backbone')):
    secvit_jax.load_classifier_into_backbone(target, wrong)
  # Another variant: secvit_s has three blocks in stage 0 where secvit_t has two.
  small = _abstract_init(secvit_jax.create_backbone('secvit_t'))
  larger = _abstract_init(secvit_jax.create_model('secvit_s'))
  with pytest.raises(ValueError, match=r'params/stage_0/block_2/.* of the classifier has no place '
                                       r'in the backbone.*and \d+ more'):
    secvit_jax.load_classifier_into_backbone(small, larger)
  with pytest.raises(ValueError, match=r'params/stage_0/block_2/.* of the backbone is not in the '
                                       'classifier'):
    secvit_jax.load_classifier_into_backbone(_abstract_init(secvit_jax.create_backbone(
        'secvit_s', out_indices=(0,))), _abstract_init(secvit_jax.create_model('secvit_t')))


_SHARDED_CHECK = """
import jax, jax.numpy as jnp, numpy as np
from secvit_jax import model as model_lib
from tests.test_model import TINY, random_variables
assert len(jax.devices()) == 4
backbone = model_lib.create_backbone('secvit_t', **TINY)
images = jax.random.normal(jax.random.key(0), (8, 44, 36, 3))  # 11x9 = 99 tokens, 32 clusters.
variables = random_variables(backbone, images[:1])
mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
apply = jax.jit(backbone.apply)
with jax.default_matmul_precision('highest'):
  sharded = apply(variables, jax.device_put(images, sharding))
  single = apply(jax.device_put(variables, jax.devices()[0]),
                 jax.device_put(images, jax.devices()[0]))
for got, want in zip(sharded, single):
  assert got.sharding.is_equivalent_to(sharding, got.ndim), got.sharding
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
print('ok')
"""


def test_a_batch_sharded_over_devices_gives_the_single_device_outputs():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', _SHARDED_CHECK], env=env, capture_output=True,
                          text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr
