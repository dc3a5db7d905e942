"""Model variables on disk (orbax): `save_variables` and `load_variables`.

A variables checkpoint is a directory:
  DIR/variables/   an orbax PyTree checkpoint of {'params': ..., 'batch_stats': ...}
  DIR/model.json   what the variables are: {'variant', 'num_classes', 'source', ...}
`python -m secvit_jax.convert` writes this layout.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

VARIABLES_ITEM = 'variables'
METADATA_FILE = 'model.json'


def save_variables(directory: str, variables: Mapping[str, Any],
                   metadata: Mapping[str, Any]) -> None:
  """Writes `variables` ({'params', 'batch_stats'}) and `metadata` (JSON) into a new `directory`."""
  directory = os.path.abspath(directory)
  os.makedirs(directory)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, VARIABLES_ITEM), dict(variables))
    checkpointer.wait_until_finished()
  with open(os.path.join(directory, METADATA_FILE), 'w') as f:
    json.dump(dict(metadata), f, indent=2)


def read_metadata(directory: str) -> dict[str, Any]:
  """The `model.json` of a variables checkpoint."""
  with open(os.path.join(directory, METADATA_FILE)) as f:
    return json.load(f)


def load_variables(path: str) -> dict[str, Any]:
  """Reads {'params', 'batch_stats'} as host NumPy arrays from a variables checkpoint.

  Raises:
    FileNotFoundError: naming `path` when it holds no variables checkpoint.
  """
  path = os.path.abspath(path)
  item = os.path.join(path, VARIABLES_ITEM)
  if not os.path.isdir(item):
    raise FileNotFoundError(
        f'{path} is not a SecViT variables checkpoint (no {VARIABLES_ITEM}/ inside); convert '
        'release weights with `python -m secvit_jax.convert`')
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(item)
  return jax.tree.map(jax.device_get, restored)
