"""RetinaNet (`heads/retinanet.py`): FPN, class and box subnets, focal and L1 losses, device NMS.

Its settings (`config.retinanet`): the modules' `fpn_features`, `head_features`, `stacked_convs`,
and the `heads.retinanet.RetinaNetSettings` fields (anchors, assignment, loss, decoding).
"""

from __future__ import annotations

from typing import Any, Mapping

from secvit_jax.heads import retinanet
from secvit_jax.tasks.detectors import base

# `config.retinanet` fields that shape the modules; the others are `RetinaNetSettings`.
MODULE_FIELDS = ('fpn_features', 'head_features', 'stacked_convs')


class RetinaNetDetector(base.Detector):
  """RetinaNet; `settings` holds its anchors, assignment, loss and decoding."""
  name = 'retinanet'
  # Another number of classes re-initializes the class logits.
  reinitialized_on_mismatch = ('params/head/class_logits/',)

  def __init__(self, fields: Mapping[str, Any]):
    fields = dict(fields)
    self.modules = {key: fields[key] for key in MODULE_FIELDS}
    try:
      self.settings = retinanet.RetinaNetSettings.from_config(
          {key: value for key, value in fields.items() if key not in MODULE_FIELDS})
    except ValueError as error:
      raise ValueError(f'config.retinanet: {error}') from None

  def build(self, backbone, num_classes, dtype) -> retinanet.RetinaNet:
    return retinanet.RetinaNet(backbone=backbone, num_classes=num_classes,
                               num_anchors=self.settings.anchors.num_per_location, dtype=dtype,
                               **self.modules)

  def loss(self, outputs, batch):
    class_maps, box_maps = outputs
    return retinanet.loss(class_maps, box_maps, batch, self.settings)

  def detect(self, outputs, image_size):
    class_maps, box_maps = outputs
    return retinanet.detect(class_maps, box_maps, image_size, self.settings)
