"""Mask R-CNN (`heads/mask_rcnn.py`): boxes and instance masks, scored on COCO's 'bbox' and 'segm'.

Its settings (`config.mask_rcnn`): the modules' `fpn_features`, `rpn_features`, `fc_features`,
`mask_features`, `mask_convs`, and the `heads.mask_rcnn.MaskRCNNSettings` fields (anchors, RPN and
RoI sampling, proposals, decoding, `mask_crop_size`). The module samples anchors and RoIs itself,
so training feeds it the ground truths and a 'sampling' PRNG stream (`module_inputs`, `rngs`).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from secvit_jax.heads import mask_rcnn
from secvit_jax.tasks.detectors import base

# `config.mask_rcnn` fields that shape the modules; the others are `MaskRCNNSettings`.
MODULE_FIELDS = ('fpn_features', 'rpn_features', 'fc_features', 'mask_features', 'mask_convs')


class MaskRCNNDetector(base.Detector):
  """Mask R-CNN; `settings` holds its anchors, sampling and decoding."""
  name = 'mask_rcnn'
  iou_types = ('bbox', 'segm')
  best_metric = 'segm_AP'
  rngs = ('sampling',)
  # Another number of classes re-initializes the class-dependent layers.
  reinitialized_on_mismatch = ('params/box_head/class_logits/', 'params/box_head/box_deltas/',
                               'params/mask_head/mask_logits/')

  def __init__(self, fields: Mapping[str, Any]):
    fields = dict(fields)
    missing = sorted(set(MODULE_FIELDS) - set(fields))
    if missing:
      raise ValueError(f'config.mask_rcnn: missing {missing}')
    self.modules = {key: fields.pop(key) for key in MODULE_FIELDS}
    try:
      self.settings = mask_rcnn.MaskRCNNSettings.from_config(fields)
    except ValueError as error:
      raise ValueError(f'config.mask_rcnn: {error}') from None

  def build(self, backbone, num_classes, dtype) -> mask_rcnn.MaskRCNN:
    return mask_rcnn.MaskRCNN(backbone=backbone, num_classes=num_classes, settings=self.settings,
                              dtype=dtype, **self.modules)

  def module_inputs(self, batch, train):
    """Each image's size; in training also the ground truths (crowds left out)."""
    inputs = {'image_size': batch['image_size']}
    if train:
      inputs.update(gt_boxes=batch['boxes'], gt_labels=batch['labels'],
                    gt_valid=batch['box_mask'] & ~batch['crowd'])
    return inputs

  def loss(self, outputs, batch):
    return mask_rcnn.loss(outputs, batch, self.settings)

  def detect(self, outputs, image_size):
    """The module decodes (and clips to `image_size`) itself: its outputs are the detections,
    with 'masks' float32 (B, D, 28, 28), each detection's mask probabilities over its box."""
    del image_size
    return dict(outputs)

  def train_batch_fields(self, batch_size, max_boxes, canvas):
    """'gt_mask_crops': uint8 (B, G, C, C), each ground truth's mask over its box, C =
    `mask_crop_size` (`detection.masks.crop_masks_to_boxes`)."""
    del canvas
    size = self.settings.mask_crop_size
    return {'gt_mask_crops': jax.ShapeDtypeStruct((batch_size, max_boxes, size, size),
                                                  jnp.uint8)}
