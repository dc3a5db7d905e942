"""SecViT (semantic equitable clustering vision transformer) in JAX/Flax."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
  from secvit_jax import checkpoints, model, tasks
  from secvit_jax.checkpoints import load_variables
  from secvit_jax.tasks import load_model
  from secvit_jax.model import (VARIANTS, BackboneLoad, SecViT, SecViTBackbone, create_backbone,
                                create_model, load_classifier_into_backbone)

# The public names load their modules (JAX, Flax, orbax: a second) when first used, so that the
# command-line tools import `secvit_jax.cli` and `secvit_jax.host_memory` in milliseconds: they
# parse the command line and restart the process with its memory settings before anything heavy
# loads.
_MODULE_OF = {'BackboneLoad': 'model', 'SecViT': 'model', 'SecViTBackbone': 'model',
              'VARIANTS': 'model', 'create_backbone': 'model', 'create_model': 'model',
              'load_classifier_into_backbone': 'model', 'load_model': 'tasks',
              'load_variables': 'checkpoints'}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
  if name in _MODULE_OF:
    return getattr(importlib.import_module(f'{__name__}.{_MODULE_OF[name]}'), name)
  if name in _MODULE_OF.values():  # `secvit_jax.model` after `import secvit_jax`, as before.
    return importlib.import_module(f'{__name__}.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
