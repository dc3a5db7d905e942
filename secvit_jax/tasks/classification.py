"""Image classification with the release's recipe: SecViT, Mixup/CutMix with label smoothing and
soft-target cross-entropy for training, top-1 / top-5 / cross-entropy for evaluation.

Config fields it reads: `model` (name + SecViT overrides), `dtype`, `image_size`, `mixup`
(`mixup_alpha`, `cutmix_alpha`, `switch_prob`, `label_smoothing`: see `secvit_jax.mixup`), and the
data fields of `secvit_jax.data.classification`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from secvit_jax import checkpoints
from secvit_jax import mixup
from secvit_jax import model as model_lib
from secvit_jax.data import classification as data_lib
from secvit_jax.tasks import base


class ClassificationTask(base.Task):
  """Batches: {'image': float32 (B, S, S, 3) normalized NHWC, 'label': int32 (B,)} (and 'mask' in
  evaluation). Results: 'top1', 'top5' (fractions of the split) and 'loss' (mean cross-entropy)."""
  name = 'classification'
  best_metric = 'top1'
  # Another number of classes re-initializes the classifier.
  reinitialized_on_mismatch = ('params/head/',)

  @staticmethod
  def create_data(config):
    return data_lib.ClassificationData(config)

  def create_model(self) -> model_lib.SecViT:
    name, overrides = base.model_fields(self.config)
    return model_lib.create_model(name, num_classes=self.info.num_classes,
                                  dtype=jnp.dtype(self.config.dtype), **overrides)

  def model_info(self):
    return checkpoints.model_info_from_config(self.config, self.info)

  def init_inputs(self):
    size = self.config.image_size
    return (jnp.zeros((1, size, size, 3), jnp.float32),)

  def abstract_train_batch(self, batch_size):
    size = self.config.image_size
    return {'image': jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
            'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

  def loss(self, model, params, model_state, batch, rng):
    """Soft-target cross-entropy of the batch mixed by Mixup/CutMix (`config.mixup`)."""
    mix_key, dropout_key = jax.random.split(rng)
    settings = self.config.mixup
    images, targets = mixup.mix_batch(
        mix_key, batch['image'], batch['label'], num_classes=self.info.num_classes,
        mixup_alpha=settings.mixup_alpha, cutmix_alpha=settings.cutmix_alpha,
        switch_prob=settings.switch_prob, label_smoothing=settings.label_smoothing)
    logits, updated = model.apply({'params': params, **model_state}, images, train=True,
                                  rngs={'dropout': dropout_key}, mutable=list(model_state))
    return optax.softmax_cross_entropy(logits, targets).mean(), ({}, updated)

  def eval_outputs(self, model, variables, batch):
    """Sums over the unpadded examples: 'loss', 'top1', 'top5' (correct predictions), 'count'."""
    logits = model.apply(variables, batch['image'], train=False)
    labels = batch['label']
    mask = batch['mask'].astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    top1 = jnp.argmax(logits, axis=-1) == labels
    top_k = min(5, self.info.num_classes)
    top5 = jnp.any(jax.lax.top_k(logits, top_k)[1] == labels[:, None], axis=-1)
    return {'loss': jnp.sum(loss * mask), 'top1': jnp.sum(top1 * mask),
            'top5': jnp.sum(top5 * mask), 'count': jnp.sum(mask)}

  def create_evaluator(self, *, workdir, step, prefix):
    del workdir, step, prefix

    def finalize(sums: dict[str, np.ndarray]) -> dict[str, float]:
      count = max(float(sums.pop('count')), 1.0)
      return {name: float(value) / count for name, value in sums.items()}

    return base.SumEvaluator(finalize)
