"""SecViT (semantic equitable clustering vision transformer) in JAX/Flax."""

from secvit_jax.checkpoints import load_model, load_variables
from secvit_jax.model import VARIANTS, SecViT, create_model

__all__ = ['SecViT', 'VARIANTS', 'create_model', 'load_model', 'load_variables']
