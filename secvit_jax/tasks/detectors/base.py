"""The detector interface: what the detection task (`tasks/detection.py`) asks of a detector.

The task owns what every detector shares: the data (COCO-style boxes on a padded canvas), the
SecViT backbone (the four stages' maps at strides 4-32, each normalized), the mapping of
detections back to the original image's pixels, COCO evaluation, `secvit-predict`'s listing and
pictures. A detector owns the rest, and is one module of this package and one line of
`DETECTORS`:

  Detector(fields)                  `fields`: `config.<name>` as a dict (tuples or JSON lists: the
                                    same settings are read back from model.json's
                                    task_settings[<name>]); a bad field is a ValueError naming it
  build(backbone, num_classes, dtype) -> the Flax module: `module(images, train, **inputs)` ->
      outputs, `inputs` = module_inputs(batch, train)
  module_inputs(batch, train) -> the module's keyword arguments from a batch (RetinaNet: none)
  rngs                              PRNG streams its module draws from in training besides
                                    'dropout' (each a key derived from the step's)
  loss(outputs, batch) -> (loss, metrics to log)           inside the jitted train step
  detect(outputs, image_size) -> {'boxes', 'scores', 'labels', 'kept'} with D detections per
      image: float32 (B, D, 4) (x0, y0, x1, y1) in canvas pixels, float32 (B, D), int32 (B, D)
      (class indices), bool (B, D) (real detections); a detector with masks adds 'masks'
      float32 (B, D, m, m): each detection's mask probabilities over its box
  train_batch_fields(batch_size, max_boxes, canvas) -> ShapeDtypeStructs of the batch fields it
      needs besides the common ones (`COMMON_TRAIN_FIELDS`), e.g. 'gt_mask_crops' (instance masks)
  iou_types                         what COCO evaluation scores: ('bbox',), or ('bbox', 'segm')
  best_metric                       the evaluation result that keeps the best checkpoint
  reinitialized_on_mismatch         its class-dependent variables (see `tasks.base.Task`)
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax

# The training batch fields of every detector (`data.detection`): 'image' float32 (B, H, W, 3)
# on the canvas, 'image_size' int32 (B, 2) (each image's height, width on it), and per image G
# padded boxes: 'boxes' float32 (B, G, 4) (x0, y0, x1, y1) in canvas pixels, 'labels' int32,
# 'crowd' bool, 'box_mask' bool (real boxes).
COMMON_TRAIN_FIELDS = ('image', 'image_size', 'boxes', 'labels', 'crowd', 'box_mask')
Outputs = Any  # A detector module's outputs, as its `loss` and `detect` read them.


class Detector(abc.ABC):
  """One detector, with its settings; see the module docstring.

  Class attributes:
    name: the `config.detector` that selects it, and the config field of its settings.
    iou_types: what its detections are scored on (`evaluation.coco.IOU_TYPES`).
    best_metric: the evaluation result (higher is better) that keeps the best checkpoint.
    rngs: the PRNG streams its module needs in training besides 'dropout'.
    reinitialized_on_mismatch: variable paths left freshly initialized when a checkpoint's shape
      differs (another number of classes).
  """
  name: ClassVar[str]
  iou_types: ClassVar[tuple[str, ...]] = ('bbox',)
  best_metric: ClassVar[str] = 'AP'
  rngs: ClassVar[tuple[str, ...]] = ()
  reinitialized_on_mismatch: ClassVar[tuple[str, ...]] = ()

  @abc.abstractmethod
  def __init__(self, fields: Mapping[str, Any]):
    """Reads and checks `config.<name>`'s fields."""

  @abc.abstractmethod
  def build(self, backbone: nn.Module, num_classes: int, dtype: Any) -> nn.Module:
    """The detector module on `backbone`, computing in `dtype`."""

  def module_inputs(self, batch: Mapping[str, jax.Array], train: bool) -> dict[str, jax.Array]:
    """The keyword arguments of `module(images, train, ...)` taken from a batch (a training
    batch, or in evaluation one with at least 'image' and 'image_size')."""
    del batch, train
    return {}

  @abc.abstractmethod
  def loss(self, outputs: Outputs, batch: Mapping[str, jax.Array]
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training loss of a batch and the metrics logged besides it."""

  @abc.abstractmethod
  def detect(self, outputs: Outputs, image_size: jax.Array) -> dict[str, jax.Array]:
    """The detections of the images, `image_size` int32 (B, 2) their sizes on the canvas."""

  def train_batch_fields(self, batch_size: int, max_boxes: int, canvas: tuple[int, int]
                         ) -> dict[str, jax.ShapeDtypeStruct]:
    """The training batch fields this detector needs besides `COMMON_TRAIN_FIELDS`."""
    del batch_size, max_boxes, canvas
    return {}
