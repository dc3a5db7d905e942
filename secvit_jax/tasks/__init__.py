"""Tasks: what each kind of training adds to the shared trainer (see `base.Task`).

`config.task` names one of `TASKS`; a new task is a module here with a `base.Task` subclass, its
data under `secvit_jax/data/`, and its line below.
"""

from __future__ import annotations

import difflib

from secvit_jax.tasks import base
from secvit_jax.tasks import classification
from secvit_jax.tasks import detection
from secvit_jax.tasks import segmentation

TASKS: dict[str, type[base.Task]] = {
    classification.ClassificationTask.name: classification.ClassificationTask,
    segmentation.SegmentationTask.name: segmentation.SegmentationTask,
    detection.DetectionTask.name: detection.DetectionTask,
}


def get_task_class(name: str) -> type[base.Task]:
  """The task `config.task` names.

  Raises:
    ValueError: naming an unknown task, the closest known one and every known one.
  """
  if name not in TASKS:
    close = difflib.get_close_matches(name, TASKS, n=1)
    hint = f'; did you mean {close[0]!r}?' if close else ''
    raise ValueError(f'unknown config.task {name!r}{hint} (tasks: {", ".join(sorted(TASKS))})')
  return TASKS[name]
