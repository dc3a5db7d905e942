"""Tasks: one module per kind of model (see `base.Task`), and `TASKS`, the one registry of them.

`config.task` (training) and model.json's `task` (`load_model`, `secvit-predict`) name one of
`TASKS`. A new task is a module here with a `base.Task` subclass, its data under
`secvit_jax/data/`, and its line below; nothing else lists the tasks.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from secvit_jax import checkpoints
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
  return base.lookup(TASKS, name, 'config.task', 'tasks')


def load_model(path: str | os.PathLike, *, step: int | None = None, ema: bool = False,
               dtype: Any = jnp.float32, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
  """The model of a checkpoint and its variables: `model.apply(variables, images)` is ready.

  Args:
    path: a converted checkpoint or a training workdir (or its checkpoints/ or checkpoints/<step>
      directory); local or a URL such as gs://...
    step: with a workdir, the training step (default: the newest).
    ema: with a workdir, the exponential moving average of the weights.
    dtype: the compute dtype (parameters stay float32).
    **overrides: SecViT fields to run the model with, e.g. `dwconv_impl='xla'`, `remat=True`.

  Returns:
    (model, variables): the Flax module that model.json describes (its task's `build_model`),
    and {'params', 'batch_stats'} as host NumPy arrays.
  """
  directory = checkpoints.checkpoint_directory(path, step)
  info = checkpoints.read_model_info(directory)
  if info.task not in TASKS:
    raise ValueError(f'{path} holds a {info.task!r} model, which this secvit_jax cannot build; '
                     f'it builds {sorted(TASKS)}')
  model = TASKS[info.task].build_model(info, dtype=dtype, **overrides)
  return model, checkpoints.load_variables(directory, ema=ema)
