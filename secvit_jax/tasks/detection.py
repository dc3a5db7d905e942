"""Object detection: SecViT + FPN + RetinaNet (`heads/retinanet.py`), trained with focal and L1
losses and evaluated with pycocotools' COCOeval (bbox).

Config fields it reads: `model` (the backbone: a SecViT variant name + overrides of
`secvit_jax.model.create_backbone`), `dtype`, `retinanet` (`fpn_features`, `head_features`,
`stacked_convs`, and the `RetinaNetSettings` fields: anchors, assignment, loss, decoding),
`save_predictions`, and the data fields of `secvit_jax.data.detection` (`dataset`, `data_dir`,
`input.canvas_size`, `input.max_size`, `max_boxes`...).

Evaluation results (fractions, COCOeval's -1 where the split has no box of a size range):
'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl'.
"""

from __future__ import annotations

import colorsys
import contextlib
import io
import json
from typing import Any, Mapping, Sequence

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont
from pycocotools import cocoeval
import tensorflow as tf

from secvit_jax import checkpoints
from secvit_jax import model as model_lib
from secvit_jax.data import detection as data_lib
from secvit_jax.heads import retinanet
from secvit_jax.tasks import base

# COCOeval's `stats`, in its order.
COCO_METRICS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100', 'ARs', 'ARm',
                'ARl')
# `config.retinanet` fields that shape the modules; the others are `RetinaNetSettings`.
MODULE_FIELDS = ('fpn_features', 'head_features', 'stacked_convs')


def settings_from_config(config) -> retinanet.RetinaNetSettings:
  return settings_from_fields(config.retinanet.to_dict())


def settings_from_fields(fields: Mapping[str, Any]) -> retinanet.RetinaNetSettings:
  """The `RetinaNetSettings` of `config.retinanet`'s fields (as a dict)."""
  try:
    return retinanet.RetinaNetSettings.from_config(
        {key: value for key, value in fields.items() if key not in MODULE_FIELDS})
  except ValueError as error:
    raise ValueError(f'config.retinanet: {error}') from None


def build_retinanet(variant: str | None, backbone_fields: Mapping[str, Any],
                    retinanet_fields: Mapping[str, Any], num_classes: int,
                    dtype: Any = jnp.float32) -> retinanet.RetinaNet:
  """RetinaNet on SecViT `variant` (None: SecViT's defaults) with `backbone_fields` overriding it
  (`model.create_backbone`), and `config.retinanet`'s fields; computing in `dtype`."""
  settings = settings_from_fields(retinanet_fields)
  fields = {key: tuple(value) if isinstance(value, list) else value
            for key, value in backbone_fields.items()}
  if variant is None:
    backbone = model_lib.SecViTBackbone(out_indices=(0, 1, 2, 3), output_norm=True, dtype=dtype,
                                        **fields)
  else:
    backbone = model_lib.create_backbone(variant, out_indices=(0, 1, 2, 3), output_norm=True,
                                         dtype=dtype, **fields)
  return retinanet.RetinaNet(
      backbone=backbone, num_classes=num_classes,
      num_anchors=settings.anchors.num_per_location,
      fpn_features=retinanet_fields['fpn_features'],
      head_features=retinanet_fields['head_features'],
      stacked_convs=retinanet_fields['stacked_convs'], dtype=dtype)


def create_detector(config, num_classes: int) -> retinanet.RetinaNet:
  """RetinaNet on the SecViT backbone of `config.model`, computing in `config.dtype`."""
  name, overrides = base.model_fields(config)
  return build_retinanet(name, overrides, config.retinanet.to_dict(), num_classes,
                         jnp.dtype(config.dtype))


def build_detector(info: checkpoints.ModelInfo, *, dtype: Any = jnp.float32,
                   **overrides: Any) -> retinanet.RetinaNet:
  """The detector a detection checkpoint's model.json describes (`checkpoints.MODEL_BUILDERS`);
  `overrides` (backbone fields, e.g. `dwconv_impl`, `remat`) replace what it records."""
  fields = {**checkpoints.check_model_overrides(info.variant, info.model_overrides), **overrides}
  return build_retinanet(info.variant, fields, info.task_settings['retinanet'], info.num_classes,
                         dtype)


def to_original_pixels(boxes: jax.Array, image_size: jax.Array,
                       orig_size: jax.Array) -> jax.Array:
  """Canvas boxes (B, D, 4) of images resized from `orig_size` to `image_size` (B, 2), mapped
  back to the original image's pixels (mmdet's division by the scale factor)."""
  scale = image_size.astype(jnp.float32) / jnp.maximum(orig_size, 1).astype(jnp.float32)
  return boxes / jnp.stack([scale[:, 1], scale[:, 0], scale[:, 1], scale[:, 0]],
                           axis=-1)[:, None, :]


class DetectionTask(base.Task):
  """Batches: see `secvit_jax.data.detection`. Loss: RetinaNet's (`retinanet.loss`), logged with
  'class_loss', 'box_loss' and 'positives' (anchors per image). Results: COCOeval's 12 numbers."""
  name = 'detection'
  best_metric = 'AP'
  # Another number of classes re-initializes the class logits.
  reinitialized_on_mismatch = ('params/head/class_logits/',)

  def __init__(self, config, info):
    super().__init__(config, info)
    self.settings = settings_from_config(config)
    self._reference = None

  @staticmethod
  def create_data(config):
    return data_lib.DetectionData(config)

  def create_model(self) -> retinanet.RetinaNet:
    return create_detector(self.config, self.info.num_classes)

  def model_info(self) -> checkpoints.ModelInfo:
    """model.json: the backbone as a classifier's (variant and overrides), and in `task_settings`
    the neck, head and decoding (`retinanet`) and the evaluation transform (`canvas_size`,
    `max_size`); `image_size` is the canvas' longer side."""
    task_settings = {'retinanet': json.loads(json.dumps(self.config.retinanet.to_dict())),
                     'canvas_size': list(self._canvas()),
                     'max_size': [int(x) for x in self.config.input.max_size]}
    return checkpoints.model_info_from_config(
        self.config, self.info, task=checkpoints.DETECTION, image_size=max(self._canvas()),
        task_settings=task_settings)

  def _canvas(self) -> tuple[int, int]:
    height, width = self.config.input.canvas_size
    return int(height), int(width)

  def init_inputs(self):
    return (jnp.zeros((1, *self._canvas(), 3), jnp.float32),)

  def abstract_train_batch(self, batch_size):
    boxes = int(self.config.max_boxes)
    spec = jax.ShapeDtypeStruct
    return {'image': spec((batch_size, *self._canvas(), 3), jnp.float32),
            'image_size': spec((batch_size, 2), jnp.int32),
            'boxes': spec((batch_size, boxes, 4), jnp.float32),
            'labels': spec((batch_size, boxes), jnp.int32),
            'crowd': spec((batch_size, boxes), jnp.bool_),
            'box_mask': spec((batch_size, boxes), jnp.bool_)}

  def loss(self, model, params, model_state, batch, rng):
    (class_maps, box_maps), updated = model.apply(
        {'params': params, **model_state}, batch['image'], train=True, rngs={'dropout': rng},
        mutable=list(model_state))
    total, metrics = retinanet.loss(class_maps, box_maps, batch, self.settings)
    return total, (metrics, updated)

  def eval_outputs(self, model, variables, batch):
    """The detections of every image in original pixels, with its id and mask."""
    class_maps, box_maps = model.apply(variables, batch['image'], train=False)
    detections = retinanet.detect(class_maps, box_maps, batch['image_size'], self.settings)
    return {'boxes': to_original_pixels(detections['boxes'], batch['image_size'],
                                        batch['orig_size']),
            'scores': detections['scores'], 'labels': detections['labels'],
            'kept': detections['kept'] & batch['mask'][:, None], 'image_id': batch['image_id']}

  def create_evaluator(self, *, workdir, step, prefix):
    if self._reference is None:
      self._reference = data_lib.evaluation_reference(self.config)
    ground_truth, category_ids = self._reference
    path = None
    if self.config.get('save_predictions') and workdir is not None:
      path = epath.Path(workdir) / 'predictions' / f'{prefix}_step_{step}.json'
    return CocoEvaluator(ground_truth, category_ids, predictions_path=path)

  def load_pretrained(self, variables, loaded, source):
    """A classifier (a converted release checkpoint or a classification workdir) fills the
    backbone, everything else keeping its initialization; a detector's checkpoint fills the whole
    model (`base.Task.load_pretrained`)."""
    if 'backbone' in loaded.get('params', {}):
      return super().load_pretrained(variables, loaded, source)
    merged, report = model_lib.load_classifier_into_backbone(variables, loaded, at='backbone')
    return merged, [f'backbone from the classifier: {report}']


class CocoEvaluator(base.Evaluator):
  """Collects one evaluation's detections on the host and scores them with COCOeval (bbox).

  Args:
    ground_truth: pycocotools' COCO of the evaluated split.
    category_ids: the category id of each label.
    predictions_path: where process 0 writes the detections in COCO's results format (a JSON list
      of {image_id, category_id, bbox [x, y, w, h], score}), or None.
    fetch_every: batches whose outputs are fetched from the devices together.
  """

  def __init__(self, ground_truth, category_ids, predictions_path: epath.Path | None = None,
               fetch_every: int = 8):
    self._ground_truth = ground_truth
    self._category_ids = np.asarray(category_ids, np.int64)
    self._path = predictions_path
    self._fetch_every = fetch_every
    self._pending: list[Mapping[str, jax.Array]] = []
    self._rows: list[np.ndarray] = []

  def add(self, outputs):
    self._pending.append(outputs)
    if len(self._pending) >= self._fetch_every:
      self._fetch()

  def _fetch(self) -> None:
    for out in jax.device_get(self._pending):
      kept = np.asarray(out['kept'])
      boxes = np.asarray(out['boxes'], np.float64)[kept]
      image_ids = np.broadcast_to(np.asarray(out['image_id'])[:, None], kept.shape)[kept]
      self._rows.append(np.concatenate([
          image_ids[:, None].astype(np.float64), boxes[:, :2], boxes[:, 2:] - boxes[:, :2],
          np.asarray(out['scores'], np.float64)[kept][:, None],
          self._category_ids[np.asarray(out['labels'])[kept]][:, None].astype(np.float64)],
          axis=1))
    self._pending = []

  def detections(self) -> np.ndarray:
    """float64 (n, 7): [image_id, x, y, w, h, score, category_id] of every detection so far."""
    self._fetch()
    return np.concatenate(self._rows) if self._rows else np.zeros((0, 7))

  def result(self) -> dict[str, float]:
    detections = self.detections()
    if self._path is not None and jax.process_index() == 0:
      write_coco_results(self._path, detections)
    return coco_metrics(self._ground_truth, detections)


def write_coco_results(path: epath.Path, detections: np.ndarray) -> None:
  """Writes `detections` ([image_id, x, y, w, h, score, category_id] rows) as COCO's results
  JSON, atomically (a temporary file renamed into place)."""
  results = [{'image_id': int(row[0]), 'category_id': int(row[6]),
              'bbox': [round(float(v), 2) for v in row[1:5]], 'score': round(float(row[5]), 5)}
             for row in detections]
  path.parent.mkdir(parents=True, exist_ok=True)
  staging = path.parent / f'.{path.name}.tmp'
  staging.write_text(json.dumps(results))
  staging.rename(path)
  logging.info('wrote %d detections to %s', len(results), path)


def coco_metrics(ground_truth, detections: np.ndarray) -> dict[str, float]:
  """COCOeval (bbox) of `detections` ([image_id, x, y, w, h, score, category_id] rows) against
  `ground_truth` over all its images: the 12 numbers of `COCO_METRICS`."""
  with contextlib.redirect_stdout(io.StringIO()):
    if len(detections):
      results = ground_truth.loadRes(detections)
    else:
      results = data_lib.coco_from_dict({
          'images': ground_truth.dataset['images'], 'annotations': [],
          'categories': ground_truth.dataset['categories']})
    evaluation = cocoeval.COCOeval(ground_truth, results, iouType='bbox')
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
  return {name: float(value) for name, value in zip(COCO_METRICS, evaluation.stats)}


# ------------------------------------------------------------------------------------------------
# Prediction on image files, and pictures of the detections.
# ------------------------------------------------------------------------------------------------


def predict(model: retinanet.RetinaNet, variables: Mapping[str, Any],
            settings: retinanet.RetinaNetSettings, images: Sequence[np.ndarray], *,
            canvas_size: Sequence[int], max_size: Sequence[int],
            batch_size: int = 8) -> list[dict[str, np.ndarray]]:
  """The detections of decoded images, as evaluation makes them.

  Args:
    model, variables: a detector and its {'params', 'batch_stats'}.
    settings: its decoding settings.
    images: uint8 (H, W, 3) RGB images, any sizes.
    canvas_size, max_size: the evaluation transform of the detector's training config
      (`config.input`): each image is resized to fit `max_size` and the canvas.
    batch_size: images per forward pass (the last batch is padded: one compilation).

  Returns:
    Per image: 'boxes' float32 (n, 4) (x0, y0, x1, y1) in the image's pixels, 'scores' float32
    (n,), 'labels' int32 (n,), best first.
  """
  transform = data_lib.Transform(canvas_size, max_size)

  @jax.jit
  def run(variables, batch):
    class_maps, box_maps = model.apply(variables, batch['image'], train=False)
    found = retinanet.detect(class_maps, box_maps, batch['image_size'], settings)
    return {**found, 'boxes': to_original_pixels(found['boxes'], batch['image_size'],
                                                 batch['orig_size'])}

  prepared = [{k: v.numpy() for k, v in transform.eval({'image': tf.constant(image)}).items()}
              for image in images]
  results = []
  for start in range(0, len(prepared), batch_size):
    chunk = prepared[start:start + batch_size]
    chunk += [chunk[-1]] * (batch_size - len(chunk))
    found = jax.device_get(run(variables, {k: np.stack([p[k] for p in chunk]) for k in chunk[0]}))
    for i in range(min(batch_size, len(prepared) - start)):
      kept = found['kept'][i]
      results.append({'boxes': found['boxes'][i][kept], 'scores': found['scores'][i][kept],
                      'labels': found['labels'][i][kept]})
  return results


def class_colour(label: int) -> tuple[int, int, int]:
  """A bright colour per class, hues spread by the golden ratio."""
  red, green, blue = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 1.0)
  return int(255 * red), int(255 * green), int(255 * blue)


def draw_detections(image: np.ndarray, detections: Mapping[str, np.ndarray],
                    class_names: Sequence[str] = (), min_score: float = 0.3) -> Image.Image:
  """`image` (uint8 (H, W, 3)) with a box per detection of score >= `min_score`, in its class's
  colour, labelled '<class name>: <score>' (the label number when `class_names` is empty)."""
  picture = Image.fromarray(np.asarray(image, np.uint8)).convert('RGB')
  draw = ImageDraw.Draw(picture)
  font = ImageFont.load_default()
  width = max(1, round(max(picture.size) / 300))
  order = np.argsort(np.asarray(detections['scores']))  # The best drawn last, on top.
  for i in order:
    score = float(detections['scores'][i])
    if score < min_score:
      continue
    label = int(detections['labels'][i])
    x0, y0, x1, y1 = (float(v) for v in detections['boxes'][i])
    colour = class_colour(label)
    draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
    text = f'{class_names[label] if class_names else label}: {score:.2f}'
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    y = y0 - (bottom - top) - 2 if y0 >= bottom - top + 2 else y0
    draw.rectangle((x0, y, x0 + right - left + 2, y + bottom - top + 2), fill=colour)
    draw.text((x0 + 1 - left, y + 1 - top), text, fill=(0, 0, 0), font=font)
  return picture
