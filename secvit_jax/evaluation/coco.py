"""COCO's detection metrics (pycocotools' COCOeval) and results files, for boxes and masks.

A split's detections are a list in COCO's results format, one dict per detection:
  {'image_id': int, 'category_id': int, 'score': float,
   'bbox': [x, y, width, height] (floats, the image's pixels),
   'segmentation': {'size': [height, width], 'counts': str} (with 'segm' only: the detection's
                   mask as COCO's compressed RLE, pycocotools.mask.encode)}
`CocoEvaluator` builds it from the batches' outputs, writes it (process 0) when asked to, and
scores it per IoU type: 'bbox' results are named as COCOeval's `stats` (`METRICS`: 'AP', 'AP50',
...), those of the other types with the type as a prefix ('segm_AP', 'segm_AP50', ...).
"""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any, Mapping, Sequence

from absl import logging
from etils import epath
import jax
import numpy as np
from pycocotools import coco as coco_api
from pycocotools import cocoeval
from pycocotools import mask as mask_api

from secvit_jax import files
from secvit_jax.detection import masks as masks_lib
from secvit_jax.evaluation import base

# COCOeval's `stats`, in its order (fractions; -1 where the split has no object of a size range).
METRICS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')
IOU_TYPES = ('bbox', 'segm')
Detection = dict[str, Any]


def result_names(iou_type: str) -> tuple[str, ...]:
  """The names of an IoU type's results: `METRICS`, prefixed with 'segm_' for masks."""
  prefix = '' if iou_type == 'bbox' else f'{iou_type}_'
  return tuple(prefix + name for name in METRICS)


def coco_from_dict(dataset: dict[str, Any]) -> coco_api.COCO:
  """A pycocotools COCO of an annotation dict (its progress prints silenced)."""
  with contextlib.redirect_stdout(io.StringIO()):
    ground_truth = coco_api.COCO()
    ground_truth.dataset = dataset
    ground_truth.createIndex()
  return ground_truth


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
  """COCO's compressed RLE of a bool (H, W) mask, its counts as str (JSON-ready)."""
  rle = mask_api.encode(np.asfortranarray(mask, np.uint8))
  return {'size': [int(side) for side in rle['size']], 'counts': rle['counts'].decode('ascii')}


def _encode_window(window: np.ndarray, top: int, left: int, height: int,
                   width: int) -> dict[str, Any]:
  """`encode_mask` of a (height, width) mask that is 0 outside bool `window` (h, w), whose top-left
  pixel is (top, left): the runs come from the window's pixels alone."""
  columns = np.zeros((window.shape[0] + 2, window.shape[1]), np.int8)
  columns[1:-1] = window
  # Where each column of the window turns on or off, in the image's column-major order.
  changed_columns, changed_rows = np.nonzero(np.diff(columns, axis=0).T)
  changes = (left + changed_columns) * height + top + changed_rows
  # A window of the image's full height continues a run from one column into the next: the end
  # of one and the start of the other fall on the same place, and cancel. A run that ends with
  # the image ends no run.
  changes, repeats = np.unique(changes, return_counts=True)
  changes = changes[(repeats == 1) & (changes < height * width)]
  counts = np.diff(np.concatenate([[0], changes, [height * width]]))
  rle = mask_api.frPyObjects({'size': [height, width], 'counts': counts.tolist()}, height, width)
  return {'size': [height, width], 'counts': rle['counts'].decode('ascii')}


def encode_pasted_masks(mask_probs: np.ndarray, boxes: np.ndarray, height: int,
                        width: int) -> list[dict[str, Any]]:
  """Each detection's mask pasted into its image as COCO's RLE, counts as str: the RLEs of
  `detection.masks.paste_masks(mask_probs, boxes, height, width)` (bilinear, threshold 0.5,
  zeros outside the box), each pasted only over its box's window of pixels.

  Args:
    mask_probs: float (D, m, m), mask probabilities over each detection's box.
    boxes: float (D, 4) (x0, y0, x1, y1) in the image's pixels.
    height, width: the image's size.
  """
  boxes = np.asarray(boxes, np.float64)
  rles = []
  for probs, box in zip(mask_probs, boxes):
    left, top = (int(np.clip(np.floor(v), 0, side)) for v, side in zip(box[:2], (width, height)))
    right, bottom = (int(np.clip(np.ceil(v), 0, side)) for v, side in zip(box[2:], (width, height)))
    shift = np.asarray([left, top, left, top], np.float64)
    window = masks_lib.paste_masks(probs[None], (box - shift)[None], max(bottom - top, 0),
                                   max(right - left, 0))
    rles.append(_encode_window(window[0], top, left, height, width))
  return rles


class CocoEvaluator(base.Evaluator):
  """Collects one evaluation's detections on the host and scores them with COCOeval.

  `add` takes a batch of D detections per image (the detection task's `eval_outputs`):
    'boxes' float (B, D, 4) (x0, y0, x1, y1) in the original image's pixels, 'scores' (B, D),
    'labels' int (B, D) (indices of `category_ids`), 'kept' bool (B, D) (real detections of real
    images), 'image_id' int (B,); for 'segm' also 'masks' float (B, D, m, m), each detection's
    mask probabilities over its box, and 'original_size' int (B, 2), each image's (height,
    width): the masks are pasted into the original image on the host and encoded as RLE
    (`encode_pasted_masks`).

  Args:
    ground_truth: pycocotools' COCO of the evaluated split.
    category_ids: the category id of each label.
    iou_types: what is scored, of `IOU_TYPES`.
    predictions_path: where process 0 writes the detections in COCO's results format, or None.
    fetch_every: batches whose outputs are fetched from the devices together.
  """

  def __init__(self, ground_truth: coco_api.COCO, category_ids: Sequence[int], *,
               iou_types: Sequence[str] = ('bbox',),
               predictions_path: epath.Path | None = None, fetch_every: int = 8):
    unknown = sorted(set(iou_types) - set(IOU_TYPES))
    if unknown or not iou_types:
      raise ValueError(f'iou_types must be some of {IOU_TYPES}, got {tuple(iou_types)}')
    self._ground_truth = ground_truth
    self._category_ids = np.asarray(category_ids, np.int64)
    self._iou_types = tuple(iou_types)
    self._path = predictions_path
    self._fetch_every = fetch_every
    self._pending: list[Mapping[str, jax.Array]] = []
    self._detections: list[Detection] = []

  def add(self, outputs):
    self._pending.append(outputs)
    if len(self._pending) >= self._fetch_every:
      self._fetch()

  def _fetch(self) -> None:
    for out in jax.device_get(self._pending):
      kept = np.asarray(out['kept'])
      for image in np.flatnonzero(kept.any(axis=1)):
        indices = np.flatnonzero(kept[image])
        boxes = np.asarray(out['boxes'][image, indices], np.float64)
        if 'segm' in self._iou_types:
          height, width = (int(side) for side in out['original_size'][image])
          masks = encode_pasted_masks(out['masks'][image, indices], boxes, height, width)
        for number, index in enumerate(indices):
          x0, y0, x1, y1 = (float(v) for v in boxes[number])
          detection = {'image_id': int(out['image_id'][image]),
                       'category_id': int(self._category_ids[out['labels'][image, index]]),
                       'bbox': [x0, y0, x1 - x0, y1 - y0],
                       'score': float(np.float64(out['scores'][image, index]))}
          if 'segm' in self._iou_types:
            detection['segmentation'] = masks[number]
          self._detections.append(detection)
    self._pending = []

  def detections(self) -> list[Detection]:
    """Every detection so far, in COCO's results format (see the module doc)."""
    self._fetch()
    return self._detections

  def result(self) -> dict[str, float]:
    detections = self.detections()
    if self._path is not None and jax.process_index() == 0:
      write_results(self._path, detections)
    results = {}
    for iou_type in self._iou_types:
      results.update(coco_metrics(self._ground_truth, detections, iou_type))
    return results


def write_results(path: epath.Path, detections: Sequence[Detection]) -> None:
  """Writes `detections` as COCO's results JSON (boxes to 0.01 pixel, scores to 1e-5),
  atomically."""
  results = [{**detection, 'bbox': [round(v, 2) for v in detection['bbox']],
              'score': round(detection['score'], 5)} for detection in detections]
  files.write_text(path, json.dumps(results))
  logging.info('wrote %d detections to %s', len(results), path)


def coco_metrics(ground_truth: coco_api.COCO, detections: Sequence[Detection],
                 iou_type: str = 'bbox') -> dict[str, float]:
  """COCOeval (`iou_type`) of `detections` against `ground_truth` over all its images: the 12
  numbers of `METRICS`, named by `result_names(iou_type)`."""
  # COCO reads a result with a box as a box, its area the box's: masks are scored without them.
  results = [{key: value for key, value in detection.items()
              if iou_type == 'bbox' or key != 'bbox'} for detection in detections]
  with contextlib.redirect_stdout(io.StringIO()):
    if results:
      loaded = ground_truth.loadRes(results)
    else:
      loaded = coco_from_dict({'images': ground_truth.dataset['images'], 'annotations': [],
                               'categories': ground_truth.dataset['categories']})
    evaluation = cocoeval.COCOeval(ground_truth, loaded, iouType=iou_type)
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
  return {name: float(value) for name, value in zip(result_names(iou_type), evaluation.stats)}
