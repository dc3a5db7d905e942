"""Object detection: a SecViT backbone under a detector of `detectors.DETECTORS` (`config.detector`,
RetinaNet by default), evaluated with pycocotools' COCOeval; `predict` lists and draws each
image's detections.

Config fields it reads: `model` (the backbone: a SecViT variant name + overrides of
`secvit_jax.model.create_backbone`), `dtype`, `detector` and its settings `config.<detector>`
(e.g. `retinanet`: see `detectors/retinanet.py`), `save_predictions`, and the data fields of
`secvit_jax.data.detection` (`dataset`, `data_dir`, `input.canvas_size`, `input.max_size`,
`max_boxes`...).

Evaluation results (`evaluation.coco`; fractions, COCOeval's -1 where the split has no object of a
size range): 'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl'
of the boxes, and the same with a 'segm_' prefix for a detector with masks.
"""

from __future__ import annotations

import collections
import colorsys
import json
import os
from typing import Any, Mapping, Sequence

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont
from pycocotools import mask as mask_api

from secvit_jax import checkpoints
from secvit_jax import class_names as class_names_lib
from secvit_jax import model as model_lib
from secvit_jax import serving
from secvit_jax.detection import masks as masks_lib
from secvit_jax.evaluation import coco
from secvit_jax.tasks import base
from secvit_jax.tasks import detectors


def detector_from_config(config: ml_collections.ConfigDict) -> detectors.base.Detector:
  """The detector `config.detector` names (RetinaNet where it names none), with its settings
  `config.<name>`.

  Raises:
    ValueError: naming an unknown detector, or one whose settings are missing.
  """
  name = config.get('detector', detectors.DEFAULT_DETECTOR)
  detector_class = detectors.get_detector_class(name)
  if name not in config:
    raise ValueError(f'config.detector={name!r} needs its settings in config.{name}')
  return detector_class(config[name].to_dict())


def canvas_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """`config.input.canvas_size` (height, width) as ints."""
  height, width = config.input.canvas_size
  return int(height), int(width)


def detector_of(task_settings: Mapping[str, Any]) -> detectors.base.Detector:
  """The detector a detection model.json's `task_settings` records (RetinaNet where it names
  none: written before there was a choice)."""
  name = task_settings.get('detector', detectors.DEFAULT_DETECTOR)
  return detectors.get_detector_class(name)(task_settings[name])


def to_original_pixels(boxes: jax.Array, image_size: jax.Array,
                       original_size: jax.Array) -> jax.Array:
  """Canvas boxes (B, D, 4) of images resized from `original_size` to `image_size` (B, 2), mapped
  back to the original image's pixels (mmdet's division by the scale factor)."""
  scale = image_size.astype(jnp.float32) / jnp.maximum(original_size, 1).astype(jnp.float32)
  return boxes / jnp.stack([scale[:, 1], scale[:, 0], scale[:, 1], scale[:, 0]],
                           axis=-1)[:, None, :]


def detect_in_original_pixels(detector: detectors.base.Detector, outputs: Any,
                              batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """`detector.detect` of a batch with 'image_size' and 'original_size', its boxes in the
  original images' pixels."""
  found = detector.detect(outputs, batch['image_size'])
  return {**found, 'boxes': to_original_pixels(found['boxes'], batch['image_size'],
                                               batch['original_size'])}


class DetectionTask(base.Task):
  """Batches: see `secvit_jax.data.detection` (and the detector's `train_batch_fields`). Loss: the
  detector's (RetinaNet's logs 'class_loss', 'box_loss' and 'positives', anchors per image;
  Mask R-CNN's its five losses, 'rpn_positives' and 'roi_positives' per image). Results:
  COCOeval's 12 numbers per IoU type of the detector, the best checkpoint by the detector's
  `best_metric`."""
  name = 'detection'
  export_limits = {
      'onnx': 'jax2onnx 0.12.5 cannot convert the batched NMS (jax.vmap over the jnp functions '
              'it replaces fails with jax 0.10.2: no jax.interpreters.batching.not_mapped)'}

  def __init__(self, config, info):
    super().__init__(config, info)
    self.detector = detector_from_config(config)
    self._reference = None

  @property
  def reinitialized_on_mismatch(self):
    return self.detector.reinitialized_on_mismatch

  @property
  def best_metric(self):
    """The detector's: 'AP' of the boxes, 'segm_AP' of the masks for Mask R-CNN."""
    return self.detector.best_metric

  @staticmethod
  def create_data(config):
    """The detection data, with the training batch fields `config.detector` asks for."""
    from secvit_jax.data import detection as data_lib  # pylint: disable=g-import-not-at-top
    return data_lib.DetectionData(config, detector_from_config(config).train_batch_fields(
        int(config.batch_size), int(config.max_boxes), canvas_size(config)))

  @classmethod
  def build_model(cls, info, *, dtype=jnp.float32, **overrides):
    """The detector of `info` on its SecViT backbone (the four stages' maps, normalized)."""
    backbone = base.build_backbone(info, dtype, overrides, out_indices=(0, 1, 2, 3),
                                   output_norm=True)
    return detector_of(info.task_settings).build(backbone, info.num_classes, dtype)

  def model_info(self) -> checkpoints.ModelInfo:
    """model.json: the backbone as a classifier's (variant and overrides), and in `task_settings`
    the detector (`detector`, and its settings under its name) and the evaluation transform
    (`canvas_size`, `max_size`); `image_size` is the canvas' longer side."""
    name = self.detector.name
    task_settings = {'detector': name, name: json.loads(json.dumps(self.config[name].to_dict())),
                     'canvas_size': list(canvas_size(self.config)),
                     'max_size': [int(x) for x in self.config.input.max_size]}
    return checkpoints.model_info_from_config(
        self.config, self.info, task=self.name, image_size=max(canvas_size(self.config)),
        task_settings=task_settings)

  def init_inputs(self):
    return (jnp.zeros((1, *canvas_size(self.config), 3), jnp.float32),)

  def abstract_train_batch(self, batch_size):
    boxes = int(self.config.max_boxes)
    spec = jax.ShapeDtypeStruct
    return {'image': spec((batch_size, *canvas_size(self.config), 3), jnp.float32),
            'image_size': spec((batch_size, 2), jnp.int32),
            'boxes': spec((batch_size, boxes, 4), jnp.float32),
            'labels': spec((batch_size, boxes), jnp.int32),
            'crowd': spec((batch_size, boxes), jnp.bool_),
            'box_mask': spec((batch_size, boxes), jnp.bool_),
            **self.detector.train_batch_fields(batch_size, boxes, canvas_size(self.config))}

  def loss(self, model, params, model_state, batch, rng):
    """The detector's loss; the step's `rng` drives dropout, and keys folded from it (1, 2, ...)
    the detector's own streams (Mask R-CNN's 'sampling')."""
    rngs = {'dropout': rng, **{name: jax.random.fold_in(rng, i + 1)
                               for i, name in enumerate(self.detector.rngs)}}
    outputs, updated = model.apply(
        {'params': params, **model_state}, batch['image'], train=True, rngs=rngs,
        mutable=list(model_state), **self.detector.module_inputs(batch, True))
    total, metrics = self.detector.loss(outputs, batch)
    return total, (metrics, updated)

  def eval_outputs(self, model, variables, batch):
    """The detections of every image in original pixels, with its id, size and mask."""
    outputs = model.apply(variables, batch['image'], train=False,
                          **self.detector.module_inputs(batch, False))
    found = detect_in_original_pixels(self.detector, outputs, batch)
    return {**found, 'kept': found['kept'] & batch['mask'][:, None],
            'image_id': batch['image_id'], 'original_size': batch['original_size']}

  def create_evaluator(self, *, workdir, step, prefix):
    if self._reference is None:
      from secvit_jax.data import detection as data_lib  # pylint: disable=g-import-not-at-top
      self._reference = data_lib.evaluation_reference(self.config)
    ground_truth, category_ids = self._reference
    path = None
    if self.config.get('save_predictions') and workdir is not None:
      path = epath.Path(workdir) / 'predictions' / f'{prefix}_step_{step}.json'
    return coco.CocoEvaluator(ground_truth, category_ids, iou_types=self.detector.iou_types,
                              predictions_path=path)

  def load_pretrained(self, variables, loaded, source):
    """A classifier (a converted release checkpoint or a classification workdir) fills the
    backbone, everything else keeping its initialization; a detector's checkpoint fills the whole
    model (`base.Task.load_pretrained`)."""
    if 'backbone' in loaded.get('params', {}):
      return super().load_pretrained(variables, loaded, source)
    merged, report = model_lib.load_classifier_into_backbone(variables, loaded, at='backbone')
    return merged, [f'backbone from the classifier: {report}']

  # secvit-predict.

  @classmethod
  def prepare_images(cls, images, info):
    """Detection resizes each image itself (`predict`): the pixels as they are."""
    long_side, short_side = info.task_settings['max_size']
    height, width = info.task_settings['canvas_size']
    return images, (f'images resized to fit {long_side}×{short_side} on a {height}×{width} '
                    'canvas')

  @classmethod
  def predict(cls, model, variables, info, images, options):
    """Each image's detections with a score >= `options.min_score`, and its picture with them
    drawn, written to `options.output_dir`: [{'picture': path, 'detections': [{'class', 'name',
    'score', 'box': [x0, y0, x1, y1] in the image's pixels, and for a detector with masks 'mask':
    COCO's RLE {'size': [height, width], 'counts': str} of the instance in the image}, ...]},
    ...], best first."""
    names = [entry.name for entry in class_names_lib.class_names(info)]
    found = detect_images(model, variables, detector_of(info.task_settings), images,
                          canvas_size=info.task_settings['canvas_size'],
                          max_size=info.task_settings['max_size'], batch_size=options.batch_size)
    os.makedirs(options.output_dir, exist_ok=True)
    results, used = [], collections.Counter()
    for path, image, detections in zip(options.images, images, found):
      stem = os.path.splitext(os.path.basename(path))[0]
      used[stem] += 1
      picture = os.path.join(options.output_dir,
                             f'{stem}{f"_{used[stem]}" if used[stem] > 1 else ""}_detections.png')
      shown = shown_detections(detections, options.min_score, image.shape[:2])
      draw_detections(image, shown, names, options.min_score).save(picture)
      listed = [{'class': int(label), 'name': names[label], 'score': float(score),
                 'box': [round(float(v), 2) for v in box]}
                for box, score, label in zip(shown['boxes'], shown['scores'], shown['labels'])]
      for entry, mask in zip(listed, shown.get('masks', ())):
        entry['mask'] = coco.encode_mask(mask)
      results.append({'picture': picture, 'detections': listed})
    return results

  @classmethod
  def show(cls, path, result, options):
    """One line per detection: score, class, box (and the mask's area in pixels); then where the
    picture is."""
    lines = [path]
    if result['detections']:
      with_masks = 'mask' in result['detections'][0]
      lines.append('  score  class  box (x0, y0, x1, y1)' + ('  mask area' if with_masks else ''))
      for d in result['detections']:
        line = f'  {d["score"]:5.2f}  {d["name"]}  ({", ".join(f"{v:.1f}" for v in d["box"])})'
        if with_masks:
          rle = {**d['mask'], 'counts': d['mask']['counts'].encode('ascii')}
          line += f'  {int(mask_api.area(rle))} px'
        lines.append(line)
    else:
      lines.append(f'  no detection scores {options.min_score} or more')
    lines.append(f'  drawn in {result["picture"]}')
    return '\n'.join(lines)

  @classmethod
  def serving_size(cls, info):
    """The canvas."""
    height, width = info.task_settings['canvas_size']
    return int(height), int(width)

  @classmethod
  def serving_preprocess(cls, pixels, size, info):
    """Resized to fit `max_size` and the canvas, keeping the aspect ratio, at its top-left."""
    return serving.on_canvas(pixels, size, info.task_settings['max_size'])

  @classmethod
  def serving_outputs(cls, model, variables, info, images, geometry, output_size):
    """The detector's decoding as evaluation runs it, boxes in the original pixels: 'boxes'
    float32 (B, D, 4) (x0, y0, x1, y1), 'scores' float32 (B, D), 'classes' int32 (B, D),
    'num_detections' int32 (B,) (the first ones of the D slots, best first); a detector with
    masks adds 'masks' float32 (B, D, M, M), each detection's mask probabilities over its box
    (pasted into the image by `detection.masks.paste_masks`, then >= 0.5)."""
    del output_size
    detector = detector_of(info.task_settings)
    sizes = {'image_size': geometry.image_size, 'original_size': geometry.original_size}
    found = detect_in_original_pixels(
        detector, model.apply(variables, images, train=False,
                              **detector.module_inputs(sizes, False)), sizes)
    served = {'boxes': found['boxes'], 'scores': found['scores'], 'classes': found['labels'],
              'num_detections': jnp.sum(found['kept'], axis=1, dtype=jnp.int32)}
    if 'masks' in found:
      served['masks'] = found['masks']
    return served


# ------------------------------------------------------------------------------------------------
# Detections of image files, and pictures of them.
# ------------------------------------------------------------------------------------------------


def detect_images(model: Any, variables: Mapping[str, Any], detector: detectors.base.Detector,
                  images: Sequence[np.ndarray], *, canvas_size: Sequence[int],
                  max_size: Sequence[int], batch_size: int = 8) -> list[dict[str, np.ndarray]]:
  """The detections of decoded images, as evaluation makes them.

  Args:
    model, variables: a detector module and its {'params', 'batch_stats'}.
    detector: its `detectors.base.Detector` (the decoding settings).
    images: uint8 (H, W, 3) RGB images, any sizes.
    canvas_size, max_size: the evaluation transform of the detector's training config
      (`config.input`): each image is resized to fit `max_size` and the canvas.
    batch_size: images per forward pass (the last batch is padded: one compilation).

  Returns:
    Per image: 'boxes' float32 (n, 4) (x0, y0, x1, y1) in the image's pixels, 'scores' float32
    (n,), 'labels' int32 (n,), best first; for a detector with masks 'masks' float32 (n, m, m),
    each detection's mask probabilities over its box (`shown_detections` pastes them).
  """
  # TensorFlow, imported here (see `base`).
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  from secvit_jax.data import detection as data_lib
  # pylint: enable=g-import-not-at-top
  transform = data_lib.Transform(canvas_size, max_size)

  @jax.jit
  def run(variables, batch):
    outputs = model.apply(variables, batch['image'], train=False,
                          **detector.module_inputs(batch, False))
    return detect_in_original_pixels(detector, outputs, batch)

  prepared = [{k: v.numpy() for k, v in transform.eval({'image': tf.constant(image)}).items()}
              for image in images]
  results = []
  for start in range(0, len(prepared), batch_size):
    chunk = prepared[start:start + batch_size]
    chunk += [chunk[-1]] * (batch_size - len(chunk))
    found = jax.device_get(run(variables, {k: np.stack([p[k] for p in chunk]) for k in chunk[0]}))
    for i in range(min(batch_size, len(prepared) - start)):
      kept = found['kept'][i]
      results.append({key: found[key][i][kept] for key in ('boxes', 'scores', 'labels', 'masks')
                      if key in found})
  return results


def shown_detections(detections: Mapping[str, np.ndarray], min_score: float,
                     image_size: Sequence[int]) -> dict[str, np.ndarray]:
  """The detections (of `detect_images`) with a score >= `min_score`, their masks (when they
  have them) pasted into the image of `image_size` (height, width): 'masks' bool (n, H, W)
  (`detection.masks.paste_masks`, as evaluation pastes them)."""
  keep = np.asarray(detections['scores']) >= min_score
  shown = {key: np.asarray(value)[keep] for key, value in detections.items()}
  if 'masks' in shown:
    shown['masks'] = masks_lib.paste_masks(shown['masks'], shown['boxes'], *image_size)
  return shown


def class_colour(label: int) -> tuple[int, int, int]:
  """A bright colour per class, hues spread by the golden ratio."""
  red, green, blue = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 1.0)
  return int(255 * red), int(255 * green), int(255 * blue)


def paint_masks(pixels: np.ndarray, masks: Sequence[np.ndarray],
                colours: Sequence[tuple[int, int, int]], opacity: float = 0.5) -> np.ndarray:
  """uint8 (H, W, 3) `pixels` with each bool (H, W) mask, in order, filled with its colour at
  `opacity` and outlined in it (its pixels with a 4-neighbour outside it or the image)."""
  painted = np.asarray(pixels, np.float32).copy()
  for mask, colour in zip(masks, colours):
    colour = np.asarray(colour, np.float32)
    painted[mask] = (1 - opacity) * painted[mask] + opacity * colour
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    painted[mask & ~inner] = colour
  return np.round(painted).astype(np.uint8)


def draw_detections(image: np.ndarray, detections: Mapping[str, np.ndarray],
                    class_names: Sequence[str] = (), min_score: float = 0.3) -> Image.Image:
  """`image` (uint8 (H, W, 3)) with a box per detection of score >= `min_score`, labelled
  '<class name>: <score>' (the label number when `class_names` is empty), in its class's colour;
  with 'masks' bool (n, H, W) (`shown_detections`), each instance in a colour of its own, its mask
  filled half-transparent and outlined (`paint_masks`) under its box."""
  scores = np.asarray(detections['scores'])
  order = [i for i in np.argsort(scores) if scores[i] >= min_score]  # The best drawn last, on top.
  masks = detections.get('masks')
  # With masks, a colour per instance (the hue of its rank among the detections), else per class.
  colours = {i: class_colour(i if masks is not None else int(detections['labels'][i]))
             for i in order}
  pixels = np.asarray(image, np.uint8)
  if masks is not None:
    pixels = paint_masks(pixels, [masks[i] for i in order], [colours[i] for i in order])
  picture = Image.fromarray(pixels).convert('RGB')
  draw = ImageDraw.Draw(picture)
  font = ImageFont.load_default()
  width = max(1, round(max(picture.size) / 300))
  for i in order:
    score = float(scores[i])
    label = int(detections['labels'][i])
    x0, y0, x1, y1 = (float(v) for v in detections['boxes'][i])
    colour = colours[i]
    draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
    text = f'{class_names[label] if class_names else label}: {score:.2f}'
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    y = y0 - (bottom - top) - 2 if y0 >= bottom - top + 2 else y0
    draw.rectangle((x0, y, x0 + right - left + 2, y + bottom - top + 2), fill=colour)
    draw.text((x0 + 1 - left, y + 1 - top), text, fill=(0, 0, 0), font=font)
  return picture
