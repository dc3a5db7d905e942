"""Semantic segmentation (mmseg's recipes): a SecViT backbone with Semantic FPN or UperNet, pixel
cross-entropy for training, one confusion matrix per evaluation for mIoU / aAcc / mAcc
(`evaluation.segmentation`); `predict` writes each image's label map, over it and as a PNG.

Config fields it reads: `model` (backbone name + SecViT overrides, as classification's), `head`
(name 'semantic_fpn' or 'upernet', channels, auxiliary head and its loss weight: see
`heads.segmentation.create_segmenter`), `dtype`, `eval` (mode 'whole' or 'slide', windows),
`save_predictions`, and the data fields of `secvit_jax.data.segmentation`.

Evaluation scores every image at its original size: the logits of its resized input are resized
bilinearly (align_corners=False) to that input's size, then to the original label map's, and
their argmax is counted against the original labels in a (classes × classes) confusion matrix,
summed exactly (int64) over the split and across hosts. Results: 'mIoU', 'aAcc', 'mAcc'
(fractions); each class's IoU and accuracy go to WORKDIR/per_class_iou/<prefix>_step<step>_<mode>
.json (`_align<k>` after the mode where whole images are aligned to a multiple k). With
`save_predictions`, each image's predicted label map is written as
WORKDIR/predictions/<prefix>_step<step>_<mode>/<name>.png, at the image's size, in the dataset's
own label values, with the dataset's palette (a palette PNG: viewers show colours, readers get the
values).
"""

from __future__ import annotations

import collections
import colorsys
import concurrent.futures
import os
import sys
from typing import Any, Mapping, Sequence

from absl import logging
from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from secvit_jax import checkpoints
from secvit_jax import model as model_lib
from secvit_jax import serving
from secvit_jax import files
from secvit_jax.data import ade20k
from secvit_jax.evaluation import segmentation as evaluation
from secvit_jax.heads import segmentation as heads
from secvit_jax.tasks import base


# ------------------------------------------------------------------------------------------------
# Loss, predictions and metrics (pure functions of arrays).
# ------------------------------------------------------------------------------------------------


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array, ignore_index: int) -> jax.Array:
  """mmseg's decode loss: cross-entropy of (B, h, w, C) logits bilinearly upsampled
  (align_corners=False) to the (B, H, W) labels' size, averaged over all B·H·W pixels with the
  ignored ones counting 0 (mmseg 0.x `reduction='mean'`)."""
  logits = heads.resize_bilinear(logits, labels.shape[1], labels.shape[2])
  valid = labels != ignore_index
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
  return jnp.sum(jnp.where(valid, losses, 0.0)) / labels.size


def resize_valid_region(x: jax.Array, sizes: jax.Array, targets: jax.Array,
                        canvas: tuple[int, int]) -> jax.Array:
  """Each example's top-left (sizes[b]) region of x, bilinearly resized (align_corners=False) to
  targets[b], at the top-left of a `canvas`.

  Args:
    x: (B, H, W, C) maps, example b valid in [0, sizes[b, 0]) × [0, sizes[b, 1]).
    sizes, targets: int32 (B, 2), (height, width) of each example's region and of its output.
    canvas: (H_out, W_out), at least every target.

  Returns:
    float32 (B, H_out, W_out, C); outside each example's target the values are meaningless.
    Within it they are PyTorch's `F.interpolate(region, target, mode='bilinear')`: pixels past
    the region's edge are replaced by the edge's before `jax.image.scale_and_translate` (which
    takes traced sizes) samples, as PyTorch clamps its source coordinates.
  """
  def resize_one(image, size, target):
    rows = jnp.minimum(jnp.arange(image.shape[0]), size[0] - 1)
    cols = jnp.minimum(jnp.arange(image.shape[1]), size[1] - 1)
    image = image[rows][:, cols]
    scale = target.astype(jnp.float32) / size.astype(jnp.float32)
    return jax.image.scale_and_translate(
        image.astype(jnp.float32), (*canvas, image.shape[2]), (0, 1), scale,
        jnp.zeros(2, jnp.float32), method='linear', antialias=False,
        precision=jax.lax.Precision.HIGHEST)

  return jax.vmap(resize_one)(x, sizes, targets)


def classes_at_size(logits: jax.Array, height: int, width: int,
                    rows_per_block: int = 64) -> jax.Array:
  """argmax of (h, w, C) logits bilinearly resized (align_corners=False) to (height, width):
  int32 (height, width), resized `rows_per_block` output rows at a time, so that a large image
  never holds all its (height, width, C) logits at once."""
  blocks = -(-height // rows_per_block)
  scale = jnp.array([height / logits.shape[0], width / logits.shape[1]], jnp.float32)

  def block(index):
    rows = jax.image.scale_and_translate(
        logits.astype(jnp.float32), (rows_per_block, width, logits.shape[2]), (0, 1), scale,
        jnp.stack([-(index * rows_per_block).astype(jnp.float32), 0.0]), method='linear',
        antialias=False, precision=jax.lax.Precision.HIGHEST)
    return jnp.argmax(rows, axis=-1).astype(jnp.int32)

  return jax.lax.map(block, jnp.arange(blocks)).reshape(-1, width)[:height]


def slide_window_corners(size: jax.Array, canvas: int, crop: int, stride: int
                         ) -> tuple[jax.Array, jax.Array]:
  """mmseg's sliding windows along one axis of an image of `size` (traced) on a `canvas`.

  Window i starts at max(min(i·stride + crop, size) - crop, 0); an image has
  max(size - crop + stride - 1, 0) // stride + 1 windows. Returns (starts, used): int32 and bool
  (N,), N the count for the whole canvas (the most any image on it has).
  """
  count = max(canvas - crop + stride - 1, 0) // stride + 1
  index = jnp.arange(count)
  starts = jnp.maximum(jnp.minimum(index * stride + crop, size) - crop, 0)
  used = index < jnp.maximum(size - crop + stride - 1, 0) // stride + 1
  return starts, used


# ------------------------------------------------------------------------------------------------
# Label maps as pictures.
# ------------------------------------------------------------------------------------------------


def class_palette(class_names: Sequence[str]) -> np.ndarray:
  """uint8 (C, 3): ADE20K's colours for its classes, else evenly spread hues (golden-ratio steps
  around the colour wheel, alternating lightness) that stay apart for any number of classes."""
  if tuple(class_names) == ade20k.CLASS_NAMES:
    return np.asarray(ade20k.PALETTE, np.uint8)
  colours = [colorsys.hls_to_rgb((0.61803398875 * i) % 1.0, 0.45 + 0.15 * (i % 2), 0.85)
             for i in range(len(class_names))]
  return np.round(np.asarray(colours) * 255).astype(np.uint8).reshape(-1, 3)


def render_label_map(image: np.ndarray, classes: np.ndarray, palette: np.ndarray,
                     opacity: float = 0.5) -> np.ndarray:
  """The colour-coded label map over the image: uint8 (H, W, 3) image, int (H, W) classes (values
  outside the palette, e.g. ignored pixels, leave the image as it is) -> uint8 (H, W, 3)."""
  known = (classes >= 0) & (classes < len(palette))
  colours = palette[np.where(known, classes, 0)].astype(np.float32)
  blended = image.astype(np.float32) * (1 - opacity) + colours * opacity
  return np.where(known[..., None], np.round(blended), image).astype(np.uint8)


def label_png(values: np.ndarray, palette: np.ndarray, reduce_zero_label: bool) -> Image.Image:
  """A label map of dataset values as a PNG image: a palette PNG (value v drawn in its class's
  colour) when the values fit 8 bits, else 16-bit grey."""
  if values.max(initial=0) < 256:
    image = Image.fromarray(values.astype(np.uint8), mode='P')
    colours = np.zeros((256, 3), np.uint8)
    offset = 1 if reduce_zero_label else 0
    colours[offset:offset + len(palette)] = palette[:256 - offset]
    image.putpalette(colours.ravel().tolist())
    return image
  return Image.fromarray(values.astype(np.uint16))


# ------------------------------------------------------------------------------------------------
# Evaluation on the host.
# ------------------------------------------------------------------------------------------------


class PredictionWriter:
  """Writes each evaluated image's predicted label map to a folder: into a hidden staging folder
  while evaluating, moved into place by `finish` (`files.move_into_place`: a failed evaluation
  leaves none). Only process 0 writes; PNG encoding runs on a thread pool."""

  def __init__(self, directory: epath.Path, names: Sequence[str], label_format: Any,
               palette: np.ndarray):
    self._directory = directory
    self._names = names
    self._label_format = label_format
    self._palette = palette
    self._enabled = jax.process_index() == 0
    self._pool = concurrent.futures.ThreadPoolExecutor(4)
    self._pending: list[concurrent.futures.Future] = []
    self.count = 0
    if self._enabled:
      self._staging = files.staging_path(directory)
      self._staging.mkdir(parents=True)

  def add(self, outputs: Mapping[str, Any]) -> None:
    """Takes a batch's 'prediction' (B, H, W), 'original_size' (B, 2), 'index' and 'mask'."""
    outputs = jax.device_get({key: outputs[key] for key in
                              ('prediction', 'original_size', 'index', 'mask')})
    if not self._enabled:
      return
    for prediction, (height, width), index, real in zip(
        outputs['prediction'], outputs['original_size'], outputs['index'], outputs['mask']):
      if real:
        values = self._label_format.to_dataset_ids(
            np.asarray(prediction[:height, :width], np.int32))
        self._pending.append(self._pool.submit(self._write, self._names[index], values))
        self.count += 1

  def _write(self, name: str, values: np.ndarray) -> None:
    image = label_png(values, self._palette, self._label_format.reduce_zero_label)
    with (self._staging / f'{name}.png').open('wb') as f:
      image.save(f, format='PNG')

  def finish(self) -> None:
    for future in self._pending:
      future.result()
    self._pool.shutdown()
    if self._enabled:
      files.move_into_place(self._staging, self._directory)
      logging.info('wrote %d predicted label maps to %s', self.count, self._directory)


# The `config.head` fields that define the model (`heads.segmentation.create_segmenter`'s).
HEAD_FIELDS = ('name', 'channels', 'neck_channels', 'pool_scales', 'dropout', 'auxiliary',
               'auxiliary_channels', 'auxiliary_in_index')


# ------------------------------------------------------------------------------------------------
# The task.
# ------------------------------------------------------------------------------------------------


class SegmentationTask(base.Task):
  """Training batches {'image': float32 (B, H, W, 3), 'label': int32 (B, H, W)}; evaluation
  batches as `data.segmentation.SegmentationData` describes. Results 'mIoU', 'aAcc', 'mAcc'."""
  name = 'segmentation'
  best_metric = 'mIoU'
  # Another number of classes re-initializes the classifiers.
  reinitialized_on_mismatch = ('params/decode_head/cls/', 'params/auxiliary_head/cls/')

  def __init__(self, config, info):
    super().__init__(config, info)
    from secvit_jax.data import segmentation as data_lib  # pylint: disable=g-import-not-at-top
    self._label_format = data_lib.label_format(config)

  @staticmethod
  def create_data(config):
    from secvit_jax.data import segmentation as data_lib  # pylint: disable=g-import-not-at-top
    return data_lib.SegmentationData(config)

  def _head(self) -> dict[str, Any]:
    return {key: self.config.head[key] for key in HEAD_FIELDS}

  @classmethod
  def build_model(cls, info, *, dtype=jnp.float32, **overrides) -> heads.Segmenter:
    """The SecViT backbone under the head `info.task_settings['head']` (the HEAD_FIELDS of a
    `config.head`) records."""
    if 'head' not in info.task_settings:
      raise ValueError(f'a segmentation model.json needs task_settings.head; got '
                       f'{dict(info.task_settings)}')
    head = dict(info.task_settings['head'])
    return heads.create_segmenter(
        base.build_backbone(info, dtype, overrides), head=head.pop('name'),
        num_classes=info.num_classes, dtype=dtype,
        **{key: tuple(value) if isinstance(value, list) else value for key, value in head.items()})

  def model_info(self) -> checkpoints.ModelInfo:
    """The backbone as a classifier's model.json records it; the head and the evaluation scale
    in `task_settings`; `image_size` the evaluation's shorter side."""
    scale = [int(side) for side in self.config.eval.scale]
    head = {key: list(value) if isinstance(value, tuple) else value
            for key, value in self._head().items()}
    return checkpoints.model_info_from_config(
        self.config, self.info, task=self.name, image_size=min(scale),
        task_settings={'head': head, 'eval_scale': scale})

  def init_inputs(self):
    height, width = self.config.input.crop_size
    return (jnp.zeros((1, height, width, 3), jnp.float32),)

  def abstract_train_batch(self, batch_size):
    height, width = self.config.input.crop_size
    return {'image': jax.ShapeDtypeStruct((batch_size, height, width, 3), jnp.float32),
            'label': jax.ShapeDtypeStruct((batch_size, height, width), jnp.int32)}

  def loss(self, model, params, model_state, batch, rng):
    """The decode head's pixel cross-entropy plus `head.auxiliary_weight` × the auxiliary head's.
    Metrics: 'decode_loss', 'aux_loss' (unweighted; with an auxiliary head) and 'accuracy' (the
    decode head's pixel accuracy on the batch's labelled pixels)."""
    outputs, updated = model.apply({'params': params, **model_state}, batch['image'], train=True,
                                   rngs={'dropout': rng}, mutable=list(model_state))
    labels, ignore = batch['label'], self._label_format.ignore_index
    logits = heads.resize_bilinear(outputs['logits'], labels.shape[1], labels.shape[2])
    decode_loss = pixel_cross_entropy(logits, labels, ignore)
    metrics = {'decode_loss': decode_loss}
    loss = decode_loss
    if 'aux_logits' in outputs:
      metrics['aux_loss'] = pixel_cross_entropy(outputs['aux_logits'], labels, ignore)
      loss = loss + self.config.head.auxiliary_weight * metrics['aux_loss']
    predicted = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1)
    valid = labels != ignore
    metrics['accuracy'] = (jnp.sum((predicted == labels) & valid)
                           / jnp.maximum(jnp.sum(valid), 1))
    return loss, (metrics, updated)

  def input_logits(self, model: nn.Module, variables: base.Variables,
                   images: jax.Array, sizes: jax.Array) -> jax.Array:
    """float32 (B, H, W, C) logits at the resolution of the (B, H, W, 3) input canvas: 'whole'
    runs the model once and resizes its logits; 'slide' averages the logits of windows of
    `eval.crop_size` at `eval.stride` (mmseg's `slide_inference`), each resized to its window,
    over each image's `sizes` region."""
    height, width = images.shape[1:3]
    ecfg = self.config.eval
    if ecfg.mode == 'whole':
      logits = model.apply(variables, images, train=False)['logits']
      return heads.resize_bilinear(logits, height, width)
    crop_h, crop_w = ecfg.crop_size
    (rows, rows_used), (cols, cols_used) = jax.vmap(
        lambda size: (slide_window_corners(size[0], height, crop_h, ecfg.stride[0]),
                      slide_window_corners(size[1], width, crop_w, ecfg.stride[1])))(sizes)
    # Windows as a flat list: (B, rows × cols) corners and whether each image has that window.
    tops = jnp.repeat(rows, cols.shape[1], axis=1)
    lefts = jnp.tile(cols, (1, rows.shape[1]))
    used = (rows_used[:, :, None] & cols_used[:, None, :]).reshape(rows.shape[0], -1)
    crop = jax.vmap(lambda image, top, left: jax.lax.dynamic_slice(
        image, (top, left, 0), (crop_h, crop_w, 3)))
    place = jax.vmap(lambda canvas, window, top, left: jax.lax.dynamic_update_slice(
        canvas, jax.lax.dynamic_slice(canvas, (top, left, 0), window.shape) + window,
        (top, left, 0)))

    def add_window(carry, window):
      sums, counts = carry
      top, left, use = window
      logits = model.apply(variables, crop(images, top, left), train=False)['logits']
      logits = heads.resize_bilinear(logits, crop_h, crop_w)
      weight = use.astype(jnp.float32)[:, None, None, None]
      sums = place(sums, logits * weight, top, left)
      counts = place(counts, jnp.broadcast_to(weight, (len(use), crop_h, crop_w, 1)), top, left)
      return (sums, counts), None

    batch = images.shape[0]
    zeros = (jnp.zeros((batch, height, width, self.info.num_classes), jnp.float32),
             jnp.zeros((batch, height, width, 1), jnp.float32))
    (sums, counts), _ = jax.lax.scan(add_window, zeros, (tops.T, lefts.T, used.T))
    return sums / jnp.maximum(counts, 1.0)

  def eval_outputs(self, model, variables, batch):
    """The batch's confusion matrix ('confusion', int32 (C, C)) at the original label size; with
    `save_predictions` also 'prediction' (int32 (B, H_l, W_l)), 'original_size', 'index' and
    'mask'."""
    logits = self.input_logits(model, variables, batch['image'], batch['size'])
    labels = batch['label']
    logits = resize_valid_region(logits, batch['size'], batch['original_size'],
                                 labels.shape[1:3])
    predictions = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    valid = (labels != self._label_format.ignore_index) & batch['mask'][:, None, None]
    outputs = {'confusion': evaluation.confusion_matrix(labels, predictions, valid,
                                                         self.info.num_classes)}
    if self.config.get('save_predictions'):
      outputs.update(prediction=predictions, original_size=batch['original_size'],
                     index=batch['index'], mask=batch['mask'])
    return outputs

  def create_evaluator(self, *, workdir, step, prefix):
    mode = self.config.eval.mode
    divisor = self.config.eval.get('size_divisor', 1)
    # Whole-image evaluations with sizes aligned to a multiple are told apart from the others.
    tag = f'{prefix}_step{step}_{mode}' + (f'_align{divisor}' if mode == 'whole' and divisor > 1
                                           else '')
    writer = None
    if self.config.get('save_predictions'):
      from secvit_jax.data import segmentation as data_lib  # pylint: disable=g-import-not-at-top
      if workdir is None:
        raise ValueError('config.save_predictions needs a workdir to write to')
      writer = PredictionWriter(
          epath.Path(workdir) / 'predictions' / tag,
          data_lib.open_source(self.config).listing(self.config.eval_split).names,
          self._label_format, class_palette(self.info.class_names))
    per_class_file = None if workdir is None else (
        epath.Path(workdir) / 'per_class_iou' / f'{tag}.json')
    return evaluation.SegmentationEvaluator(
        self.info.class_names, per_class_file,
        {'step': step, 'model': prefix, 'eval_mode': mode, 'size_divisor': divisor}, writer)

  def load_pretrained(self, variables, loaded, source):
    """A segmenter's checkpoint loads whole (classifiers of another class count re-initialized);
    a classifier's (a converted release checkpoint, a classification workdir) loads into the
    backbone, the rest keeping its initialization."""
    if 'backbone' in loaded.get('params', {}):
      return super().load_pretrained(variables, loaded, source)
    try:
      merged, report = model_lib.load_classifier_into_backbone(variables, loaded, at='backbone')
    except ValueError as error:
      raise ValueError(f'init_from {source}: {error}') from None
    return merged, [f'a classifier into the backbone: {report}']

  # secvit-predict.

  @classmethod
  def prepare_images(cls, images, info):
    """Segmentation resizes each image itself (`predict`): the pixels as they are."""
    long_side, short_side = info.task_settings['eval_scale']
    return images, f'images resized to fit {long_side}×{short_side}'

  @classmethod
  def predict(cls, model, variables, info, images, options):
    """Each image's label map at its own size, written to options.output_dir as
    <name>_segmentation.png (over the image) and <name>_labels.png; results: {'overlay',
    'label_map' (the files), 'classes': [{'class', 'name', 'fraction'}, ...] by decreasing
    area}."""
    # TensorFlow's ops, imported here (see `base`).
    from secvit_jax.data import segmentation as data_lib  # pylint: disable=g-import-not-at-top
    names = list(info.class_names or [str(index) for index in range(info.num_classes)])
    palette = class_palette(names)
    scale = info.task_settings['eval_scale']
    classes_of = jax.jit(
        lambda v, x, height, width: classes_at_size(
            heads.resize_bilinear(model.apply(v, x[None])['logits'], *x.shape[:2])[0],
            height, width), static_argnums=(2, 3))
    os.makedirs(options.output_dir, exist_ok=True)
    taken = collections.Counter()
    results = []
    for path, image in zip(options.images, images):
      height, width = image.shape[:2]
      size = data_lib.rescaled_size(height, width, scale)
      inputs = np.asarray(data_lib.eval_image(image, size))
      classes = np.asarray(classes_of(variables, inputs, height, width))
      stem = os.path.splitext(os.path.basename(path))[0]
      taken[stem] += 1
      if taken[stem] > 1:  # Images of the same name from other folders.
        stem = f'{stem}_{taken[stem]}'
      overlay = os.path.join(options.output_dir, f'{stem}_segmentation.png')
      label_map = os.path.join(options.output_dir, f'{stem}_labels.png')
      Image.fromarray(render_label_map(image, classes, palette)).save(overlay)
      label_png(classes, palette, reduce_zero_label=False).save(label_map)
      counts = np.bincount(classes.ravel(), minlength=info.num_classes)
      order = np.argsort(-counts, kind='stable')[:options.top]
      results.append({'overlay': overlay, 'label_map': label_map, 'classes': [
          {'class': int(index), 'name': names[index],
           'fraction': float(counts[index] / classes.size)}
          for index in order if counts[index]]})
      if len(images) > 1:
        print(f'{len(results)}/{len(images)} images', file=sys.stderr)
    return results

  @classmethod
  def show(cls, path, result, options):
    """Where the pictures went, and the classes by the share of the image they cover."""
    del options
    lines = [f'{path} -> {result["overlay"]}, {result["label_map"]}', '  share  class']
    lines += [f'  {100 * entry["fraction"]:5.1f}%  {entry["name"]}'
              for entry in result['classes']]
    return '\n'.join(lines)

  @classmethod
  def serving_preprocess(cls, pixels, size, info):
    """The whole image resized to (H, W)."""
    del info
    return serving.stretch(pixels, size)

  @classmethod
  def serving_outputs(cls, model, variables, info, images, geometry, output_size):
    """'logits' float32 (B, *output_size, K): the per-pixel class logits resized bilinearly
    (align_corners=False, as evaluation) to `output_size`."""
    del info, geometry
    logits = model.apply(variables, images, train=False)['logits'].astype(jnp.float32)
    return {'logits': heads.resize_bilinear(logits, *output_size)}
