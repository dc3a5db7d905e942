"""The device mesh and how arrays are laid out on it, as the config declares.

The mesh has two axes, `data` and `fsdp` (`config.mesh.data`, `config.mesh.fsdp`; -1 takes the
devices the other axis leaves). A batch is split over both axes, so both are data parallel; the
`fsdp` axis also shards parameters and optimizer state (fully sharded data parallel). With the
default mesh (every device on `data`) everything but the batch is replicated.

`config.sharding_rules` decides each array of the training state: a sequence of
(regex, strategy) pairs, tried in order; the first whose regex `re.search`-es the array's path
('variables/params/stage_2/block_0/attn/qkv/kernel', 'opt_state/0/mu/head/bias', ...) wins.
Strategies:
  'replicate'  a full copy on every device;
  'fsdp'       the largest dimension divisible by the `fsdp` axis size is split over it (an array
               with no such dimension, e.g. a scalar, is replicated).
An array no rule matches is an error naming it.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
# A batch's first dimension is split over every device.
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
STRATEGIES = ('replicate', 'fsdp')


def create_mesh(mesh_config: ml_collections.ConfigDict,
                devices: Sequence[Any] | None = None) -> Mesh:
  """A (data, fsdp) mesh over `devices` (default: all of them, or abstract TPU devices).

  Args:
    mesh_config: `data` and `fsdp` axis sizes; one of them may be -1 (the remaining devices).
    devices: the devices to lay out, e.g. `jax.experimental.topologies` devices.

  Raises:
    ValueError: naming the sizes when they do not multiply to the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = {DATA_AXIS: int(mesh_config.data), FSDP_AXIS: int(mesh_config.fsdp)}
  unknown = [axis for axis, size in sizes.items() if size == -1]
  if len(unknown) > 1:
    raise ValueError(f'at most one mesh axis may be -1, got {sizes}')
  if unknown:
    known = int(np.prod([size for size in sizes.values() if size != -1]))
    if known <= 0 or len(devices) % known:
      raise ValueError(f'mesh {sizes} does not divide the {len(devices)} devices')
    sizes[unknown[0]] = len(devices) // known
  if int(np.prod(list(sizes.values()))) != len(devices):
    raise ValueError(f'mesh {sizes} needs {int(np.prod(list(sizes.values())))} devices, '
                     f'there are {len(devices)}')
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((sizes[DATA_AXIS], sizes[FSDP_AXIS]), (DATA_AXIS, FSDP_AXIS),
                       axis_types=auto, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Splits the first (batch) dimension over every device of `mesh`."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def path_name(path: Sequence[Any]) -> str:
  """'a/b/0/c' for a `jax.tree_util` key path."""
  parts = []
  for key in path:
    for attribute in ('key', 'name', 'idx'):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def partition_spec(shape: Sequence[int], strategy: str, mesh: Mesh) -> PartitionSpec:
  """The PartitionSpec of an array of `shape` under `strategy` ('replicate' or 'fsdp')."""
  if strategy not in STRATEGIES:
    raise ValueError(f'unknown sharding strategy {strategy!r}; choose one of {STRATEGIES}')
  fsdp_size = mesh.shape[FSDP_AXIS]
  if strategy == 'replicate' or fsdp_size == 1:
    return PartitionSpec()
  divisible = [dim for dim, size in enumerate(shape) if size % fsdp_size == 0]
  if not divisible:
    return PartitionSpec()
  largest = max(divisible, key=lambda dim: (shape[dim], -dim))
  return PartitionSpec(*(FSDP_AXIS if dim == largest else None for dim in range(len(shape))))


def tree_shardings(tree: Any, rules: Sequence[Sequence[str]], mesh: Mesh) -> Any:
  """NamedShardings for every array (or ShapeDtypeStruct) of `tree`, by the first matching rule.

  Raises:
    ValueError: naming the first array no rule matches.
  """
  compiled = [(re.compile(pattern), strategy) for pattern, strategy in rules]

  def sharding_of(path, leaf):
    name = path_name(path)
    for pattern, strategy in compiled:
      if pattern.search(name):
        return NamedSharding(mesh, partition_spec(leaf.shape, strategy, mesh))
    raise ValueError(f'no sharding rule matches {name!r}; rules are {list(rules)}')

  return jax.tree_util.tree_map_with_path(sharding_of, tree)
