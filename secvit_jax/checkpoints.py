"""Model variables on disk (orbax): `save_variables`, and `load_variables` from any checkpoint.

A variables checkpoint is a directory:
  DIR/variables/   an orbax PyTree checkpoint of {'params': ..., 'batch_stats': ...}
  DIR/model.json   what the variables are: {'variant', 'num_classes', 'source', ...}
`python -m secvit_jax.convert` writes this layout.

A training workdir (see `train_lib`) holds its checkpoints in WORKDIR/checkpoints/<step>/, each
with the items `variables`, `ema_variables` (the same tree, averaged; absent when the run keeps no
EMA) and `opt_state`, written and read by an orbax CheckpointManager (`create_manager`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

VARIABLES_ITEM = 'variables'
EMA_VARIABLES_ITEM = 'ema_variables'
OPT_STATE_ITEM = 'opt_state'
METADATA_FILE = 'model.json'
CHECKPOINTS_DIR = 'checkpoints'


def save_variables(directory: str, variables: Mapping[str, Any],
                   metadata: Mapping[str, Any]) -> None:
  """Writes `variables` ({'params', 'batch_stats'}) and `metadata` (JSON) into a new `directory`."""
  directory = os.path.abspath(directory)
  os.makedirs(directory)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, VARIABLES_ITEM), dict(variables))
    checkpointer.wait_until_finished()
  with open(os.path.join(directory, METADATA_FILE), 'w') as f:
    json.dump(dict(metadata), f, indent=2)


def read_metadata(directory: str) -> dict[str, Any]:
  """The `model.json` of a variables checkpoint."""
  with open(os.path.join(directory, METADATA_FILE)) as f:
    return json.load(f)


def as_path(path: str | os.PathLike) -> epath.Path:
  """`path` as an epath.Path: absolute if local; gs:// and other URLs as they are."""
  path = os.fspath(path)
  return epath.Path(path if '://' in path else os.path.abspath(path))


def manager_directory(workdir: str | os.PathLike) -> epath.Path:
  """Where a training workdir keeps its orbax CheckpointManager."""
  return as_path(workdir) / CHECKPOINTS_DIR


def checkpoint_directory(path: str | os.PathLike, step: int | None = None) -> epath.Path:
  """The directory holding the `variables` item that `path` (and `step`) designate.

  Args:
    path: a converted checkpoint or one training step's checkpoint (DIR/variables), a training
      workdir (DIR/checkpoints/<step>), or a CheckpointManager directory (DIR/<step>).
    step: the training step to read; default the newest. Only for workdirs and managers.

  Raises:
    FileNotFoundError: naming `path` (and `step`) when no such checkpoint is there.
  """
  path = as_path(path)
  if (path / VARIABLES_ITEM).is_dir():
    if step is not None:
      raise ValueError(f'{path} is a single checkpoint; step={step} applies to a training '
                       'workdir or its checkpoints directory')
    return path
  manager = manager_directory(path) if manager_directory(path).is_dir() else path
  steps = ocp.path.step.checkpoint_steps(manager) if manager.is_dir() else []
  if not steps:
    raise FileNotFoundError(
        f'{path} holds no SecViT checkpoint (neither {VARIABLES_ITEM}/ nor training checkpoints '
        'inside); convert release weights with `python -m secvit_jax.convert`')
  step = max(steps) if step is None else step
  if step not in steps:
    raise FileNotFoundError(f'{manager} has no checkpoint of step {step}; it has {sorted(steps)}')
  return manager / str(step)


def load_variables(path: str | os.PathLike, *, step: int | None = None,
                   ema: bool = False) -> dict[str, Any]:
  """Reads {'params', 'batch_stats'} as host NumPy arrays from any SecViT checkpoint.

  Args:
    path: a converted checkpoint, a training workdir, its `checkpoints/` directory, or one step's
      checkpoint directory (see `checkpoint_directory`); local or a URL such as gs://...
    step: with a workdir or checkpoints directory, the training step (default: the newest).
    ema: read the exponential moving average of a training checkpoint instead of the model.

  Raises:
    FileNotFoundError: naming `path` when it holds no such checkpoint (or no EMA).
  """
  directory = checkpoint_directory(path, step)
  item = directory / (EMA_VARIABLES_ITEM if ema else VARIABLES_ITEM)
  if not item.is_dir():
    raise FileNotFoundError(
        f'{directory} has no EMA variables: a converted checkpoint holds one set of weights '
        '(convert the release\'s EMA with `python -m secvit_jax.convert --ema`)')
  # Restored as NumPy whatever the devices and sharding they were saved from.
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = handler.metadata(item).tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return handler.restore(item, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
  finally:
    handler.close()


# ------------------------------------------------------------------------------------------------
# Training checkpoints.
# ------------------------------------------------------------------------------------------------


def create_manager(workdir: epath.Path, *, keep: int, best_metric: str | None,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """Asynchronous orbax checkpoints in WORKDIR/checkpoints: the newest `keep`, and the best by the
  metric `best_metric` (higher is better) of those saved with metrics. `read_only` creates
  nothing (for evaluation)."""
  policies = [ocp.checkpoint_managers.LatestN(n=keep)]
  if best_metric:
    policies.append(ocp.checkpoint_managers.BestN(
        get_metric_fn=lambda metrics: metrics[best_metric], n=1,
        keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=True, read_only=read_only, create=not read_only)
  return ocp.CheckpointManager(manager_directory(workdir), options=options)


def save_items(manager: ocp.CheckpointManager, step: int, items: Mapping[str, Any],
               metrics: Mapping[str, float] | None = None) -> None:
  """Starts an asynchronous save of the pytrees `items` (e.g. variables, ema_variables,
  opt_state) as checkpoint `step`; returns once they are copied to the host."""
  manager.save(step, args=ocp.args.Composite(**{
      name: ocp.args.StandardSave(tree) for name, tree in items.items()}),
               metrics=dict(metrics) if metrics else None, force=True)


def restore_items(manager: ocp.CheckpointManager, step: int,
                  abstract_items: Mapping[str, Any]) -> dict[str, Any]:
  """Checkpoint `step`'s items, laid out as the ShapeDtypeStructs (with shardings) of
  `abstract_items` say."""
  restored = manager.restore(step, args=ocp.args.Composite(**{
      name: ocp.args.StandardRestore(tree) for name, tree in abstract_items.items()}))
  return {name: restored[name] for name in abstract_items}


def training_steps(workdir: str | os.PathLike) -> Sequence[int]:
  """The steps of the training checkpoints in `workdir`, oldest first; creates nothing."""
  directory = manager_directory(workdir)
  return sorted(ocp.path.step.checkpoint_steps(directory)) if directory.is_dir() else []
