"""The detection task's detectors (see `base.Detector`): `config.detector` names one of
`DETECTORS`, its settings are `config.<name>`. A new detector is a module here with a
`base.Detector` subclass and its line below."""

from __future__ import annotations

from secvit_jax.tasks import base as tasks_base
from secvit_jax.tasks.detectors import base
from secvit_jax.tasks.detectors import mask_rcnn
from secvit_jax.tasks.detectors import retinanet

DETECTORS: dict[str, type[base.Detector]] = {
    retinanet.RetinaNetDetector.name: retinanet.RetinaNetDetector,
    mask_rcnn.MaskRCNNDetector.name: mask_rcnn.MaskRCNNDetector,
}
# The detector of a config or a model.json that names none (from before there was a choice).
DEFAULT_DETECTOR = retinanet.RetinaNetDetector.name


def get_detector_class(name: str) -> type[base.Detector]:
  """The detector `config.detector` names.

  Raises:
    ValueError: naming an unknown detector, the closest known one and every known one.
  """
  return tasks_base.lookup(DETECTORS, name, 'config.detector', 'detectors')
