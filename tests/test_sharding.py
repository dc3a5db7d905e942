"""The mesh and the partition rules of `secvit_jax.sharding` (no devices needed)."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from secvit_jax import sharding

MESH_2x4 = jax.sharding.AbstractMesh((2, 4), (sharding.DATA_AXIS, sharding.FSDP_AXIS))
MESH_8x1 = jax.sharding.AbstractMesh((8, 1), (sharding.DATA_AXIS, sharding.FSDP_AXIS))


def test_fsdp_splits_the_largest_divisible_dimension():
  assert sharding.partition_spec((3, 3, 1, 64), 'fsdp', MESH_2x4) == P(None, None, None, 'fsdp')
  assert sharding.partition_spec((256, 768), 'fsdp', MESH_2x4) == P(None, 'fsdp')
  assert sharding.partition_spec((12, 6), 'fsdp', MESH_2x4) == P('fsdp', None)
  assert sharding.partition_spec((3, 6), 'fsdp', MESH_2x4) == P()  # Nothing divides by 4.
  assert sharding.partition_spec((), 'fsdp', MESH_2x4) == P()
  assert sharding.partition_spec((256, 768), 'fsdp', MESH_8x1) == P()
  assert sharding.partition_spec((256, 768), 'replicate', MESH_2x4) == P()
  with pytest.raises(ValueError, match="unknown sharding strategy 'tp'"):
    sharding.partition_spec((4,), 'tp', MESH_2x4)


def test_first_matching_rule_decides_and_unmatched_arrays_are_errors():
  tree = {'params': {'head': {'kernel': np.zeros((8, 16))}, 'proj': {'kernel': np.zeros((8, 16))}},
          'opt_state': (np.zeros(()),)}
  rules = (('head/', 'replicate'), ('.*', 'fsdp'))
  specs = jax.tree.map(lambda s: s.spec, sharding.tree_shardings(tree, rules, MESH_2x4))
  assert specs == {'params': {'head': {'kernel': P()}, 'proj': {'kernel': P(None, 'fsdp')}},
                   'opt_state': (P(),)}
  with pytest.raises(ValueError, match="no sharding rule matches 'opt_state/0'"):
    sharding.tree_shardings(tree, (('params/', 'fsdp'),), MESH_2x4)


def test_mesh_sizes_fill_and_mismatches_are_errors():
  devices = jax.devices()[:1]
  mesh = sharding.create_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1}), devices)
  assert dict(mesh.shape) == {'data': 1, 'fsdp': 1}
  with pytest.raises(ValueError, match='needs 2 devices, there are 1'):
    sharding.create_mesh(ml_collections.ConfigDict({'data': 2, 'fsdp': 1}), devices)
  with pytest.raises(ValueError, match='at most one mesh axis may be -1'):
    sharding.create_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': -1}), devices)
