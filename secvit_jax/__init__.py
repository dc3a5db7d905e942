"""SecViT (semantic equitable clustering vision transformer) in JAX/Flax."""

from secvit_jax.checkpoints import load_variables
from secvit_jax.model import (VARIANTS, BackboneLoad, SecViT, SecViTBackbone, create_backbone,
                              create_model, load_classifier_into_backbone)

__all__ = ['BackboneLoad', 'SecViT', 'SecViTBackbone', 'VARIANTS', 'create_backbone',
           'create_model', 'load_classifier_into_backbone', 'load_variables']
