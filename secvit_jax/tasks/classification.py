"""Image classification with the release's recipe: SecViT, Mixup/CutMix with label smoothing and
soft-target cross-entropy for training, top-1 / top-5 / cross-entropy for evaluation; `predict`
lists each image's most probable classes.

Config fields it reads: `model` (name + SecViT overrides), `dtype`, `image_size`, `mixup`
(`mixup_alpha`, `cutmix_alpha`, `switch_prob`, `label_smoothing`: see `secvit_jax.mixup`), and the
data fields of `secvit_jax.data.classification`.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from secvit_jax import checkpoints
from secvit_jax import class_names as class_names_lib
from secvit_jax import mixup
from secvit_jax import model as model_lib
from secvit_jax import serving
from secvit_jax.evaluation import base as evaluation
from secvit_jax.tasks import base


def prepare_image(image: np.ndarray, size: int | tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """An image as a classifier sees it.

  Args:
    image: uint8 (H, W, 3).
    size: S, the evaluation transform of a model trained at S×S (the shorter side resized to
      S·256/224, the central S×S crop: `data.classification.eval_crop`); or (height, width) to
      resize the whole image to.

  Returns:
    (view, inputs): the uint8 (h, w, 3) pixels the model sees and the float32 (h, w, 3)
    normalized model input.
  """
  # TensorFlow's ops, imported here (see `base`): the commands load TensorFlow after their quiet
  # start-up.
  # pylint: disable=g-import-not-at-top
  from secvit_jax.data import classification as data_lib
  from secvit_jax.data import ops
  # pylint: enable=g-import-not-at-top
  if isinstance(size, int):
    view = data_lib.eval_crop(image, size)
  else:
    view = ops.resize_bicubic(image, size[0], size[1], pil_rounding=True)
  return np.asarray(view), np.asarray(ops.normalize(view))


def batched_apply(model: Any, variables: Any, images: np.ndarray, batch_size: int) -> np.ndarray:
  """model.apply over `images` in batches of `batch_size` (the last padded: one compilation)."""
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  batch_size = min(batch_size, len(images))
  outputs = []
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    padding = batch_size - len(batch)
    padded = np.concatenate([batch, np.zeros((padding, *batch.shape[1:]), batch.dtype)])
    outputs.append(np.asarray(apply(variables, padded))[:len(batch)])
    if len(images) > batch_size:
      print(f'{start + len(batch)}/{len(images)} images', file=sys.stderr)
  return np.concatenate(outputs)


class ClassificationTask(base.Task):
  """Batches: {'image': float32 (B, S, S, 3) normalized NHWC, 'label': int32 (B,)} (and 'mask' in
  evaluation). Results: 'top1', 'top5' (fractions of the split) and 'loss' (mean cross-entropy)."""
  name = 'classification'
  best_metric = 'top1'
  # Another number of classes re-initializes the classifier.
  reinitialized_on_mismatch = ('params/head/',)

  @staticmethod
  def create_data(config):
    from secvit_jax.data import classification as data_lib  # pylint: disable=g-import-not-at-top
    return data_lib.ClassificationData(config)

  @classmethod
  def build_model(cls, info, *, dtype=jnp.float32, **overrides) -> model_lib.SecViT:
    """The SecViT classifier of `info`."""
    fields = base.secvit_fields(info, overrides)
    if info.variant is None:
      return model_lib.SecViT(num_classes=info.num_classes, dtype=dtype, **fields)
    return model_lib.create_model(info.variant, num_classes=info.num_classes, dtype=dtype,
                                  **fields)

  def model_info(self):
    return checkpoints.model_info_from_config(self.config, self.info, task=self.name)

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

    return evaluation.SumEvaluator(finalize)

  @classmethod
  def prepare_images(cls, images, info):
    """float32 (B, S, S, 3): the images as a classifier of `info` is evaluated on them."""
    return (np.stack([prepare_image(image, info.image_size)[1] for image in images]),
            f'evaluated at {info.image_size}×{info.image_size}')

  @classmethod
  def predict(cls, model, variables, info, images, options):
    """The `options.top` most probable classes per image: [{'top': [{'class', 'label', 'name',
    'description', 'probability'}, ...]}, ...]."""
    names = class_names_lib.class_names(info)
    logits = np.asarray(batched_apply(model, variables, images, options.batch_size))
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    top = min(options.top, info.num_classes)
    results = []
    for row in probabilities:
      best = np.argsort(-row, kind='stable')[:top]
      results.append({'top': [
          {'class': int(index), **dataclasses.asdict(names[index]),
           'probability': float(row[index])} for index in best]})
    return results

  @classmethod
  def show(cls, path, result, options):
    """A small table: rank, probability, name (and the label where the name does not show it)."""
    del options
    lines = [path, '  rank  probability  class']
    for rank, entry in enumerate(result['top'], start=1):
      label = f'  [{entry["label"]}]' if entry['label'] not in entry['name'] else ''
      lines.append(f'  {rank:>4}  {100 * entry["probability"]:10.2f}%  {entry["name"]}{label}')
    return '\n'.join(lines)

  @classmethod
  def serving_preprocess(cls, pixels, size, info):
    """The evaluation crop: scaled to cover (H, W)·256/224, the central H×W."""
    del info
    return serving.centre_crop(pixels, size)

  @classmethod
  def serving_outputs(cls, model, variables, info, images, geometry, output_size):
    """'logits' float32 (B, K)."""
    del info, geometry, output_size
    return {'logits': model.apply(variables, images, train=False).astype(jnp.float32)}
