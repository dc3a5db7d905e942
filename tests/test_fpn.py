"""The FPN neck: parameter counts of the recipes, output shapes, PyTorch's nearest resize."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from secvit_jax.heads import fpn


def _backbone_maps(height, width, channels=(64, 128, 256, 512)):
  """(1, H_i, W_i, C_i) zeros at strides 4, 8, 16, 32 of a (height, width) image, each size
  rounded up at every stride-2 step as SecViT's are."""
  maps = []
  for level, channel in enumerate(channels):
    for _ in range(2 if level == 0 else 1):
      height, width = -(-height // 2), -(-width // 2)
    maps.append(jnp.zeros((1, height, width, channel)))
  return maps


def _count(variables):
  return sum(x.size for x in jax.tree.leaves(variables['params']))


def test_semantic_fpn_neck_has_the_recipe_parameter_count():
  neck = fpn.FPN(features=256, num_outputs=4)
  maps = _backbone_maps(64, 64)
  variables = jax.eval_shape(lambda: neck.init(jax.random.key(0), maps))
  assert _count(variables) == 2_607_104  # mmseg's count: the Semantic FPN neck of secvit_t.
  outputs = jax.eval_shape(lambda: neck.apply(neck.init(jax.random.key(0), maps), maps))
  assert [o.shape for o in outputs] == [(1, 16, 16, 256), (1, 8, 8, 256), (1, 4, 4, 256),
                                        (1, 2, 2, 256)]


@pytest.mark.parametrize('extra_convs_on_input, count', [(True, 3_770_368), (False, 2_000_384)])
def test_retinanet_neck_levels_and_parameters(extra_convs_on_input, count):
  neck = fpn.FPN(features=256, num_outputs=5, start_level=1,
                 extra_convs_on_input=extra_convs_on_input)
  maps = _backbone_maps(800, 1216)
  variables = jax.eval_shape(lambda: neck.init(jax.random.key(0), maps))
  assert _count(variables) == count
  outputs = jax.eval_shape(lambda: neck.apply(neck.init(jax.random.key(0), maps), maps))
  assert [o.shape[1:3] for o in outputs] == [(100, 152), (50, 76), (25, 38), (13, 19), (7, 10)]


@pytest.mark.parametrize('size_in, size_out', [((13, 19), (25, 38)), ((4, 4), (8, 8)),
                                               ((7, 5), (13, 10)), ((6, 9), (4, 5))])
def test_resize_nearest_matches_pytorch(size_in, size_out):
  x = np.random.default_rng(0).normal(size=(2, *size_in, 3)).astype(np.float32)
  ours = fpn.resize_nearest(jnp.asarray(x), *size_out)
  theirs = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2),
                                           size=size_out, mode='nearest').permute(0, 2, 3, 1)
  np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


def test_top_down_path_adds_the_upsampled_coarser_level():
  neck = fpn.FPN(features=4, num_outputs=2)
  maps = [jnp.ones((1, 4, 4, 2)), jnp.ones((1, 2, 2, 3))]
  variables = neck.init(jax.random.key(0), maps)
  # With identity-like output convs the finest output is lateral_0 + upsampled lateral_1.
  params = jax.tree.map(np.asarray, variables['params'])
  for i in range(2):
    kernel = np.zeros((3, 3, 4, 4), np.float32)
    kernel[1, 1] = np.eye(4)
    params[f'output_{i}'] = {'kernel': kernel, 'bias': np.zeros(4, np.float32)}
  finest, coarse = neck.apply({'params': params}, maps)
  lateral = lambda name, x: x @ params[name]['kernel'][0, 0] + params[name]['bias']
  expected_coarse = lateral('lateral_1', np.ones((1, 2, 2, 3), np.float32))
  np.testing.assert_allclose(coarse, expected_coarse, rtol=1e-6)
  expected = lateral('lateral_0', np.ones((1, 4, 4, 2), np.float32)) + np.repeat(
      np.repeat(expected_coarse, 2, axis=1), 2, axis=2)
  np.testing.assert_allclose(finest[:, 1:-1, 1:-1], expected[:, 1:-1, 1:-1], rtol=1e-5)
