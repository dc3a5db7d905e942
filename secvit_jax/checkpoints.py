"""Checkpoints on disk: model variables (orbax) and `model.json` that says what they are. Storage
only: the model a model.json describes is built by its task (`tasks.load_model`).

A converted checkpoint (`python -m secvit_jax.convert`) is a directory:
  DIR/variables/   an orbax PyTree checkpoint of {'params': ..., 'batch_stats': ...}
  DIR/model.json   the model the variables belong to (below)

A training workdir (see `train_lib`) holds WORKDIR/model.json, written when a run starts, and its
checkpoints in WORKDIR/checkpoints/<step>/, each with the items `variables`, `ema_variables` (the
same tree, averaged; absent when the run keeps no EMA) and `opt_state`, written and read by an
orbax CheckpointManager (`create_manager`).

model.json, one JSON object (`ModelInfo`):
  task             'classification', 'segmentation' or 'detection': the `tasks.TASKS` entry
                   whose `build_model` makes the model.
  variant          'secvit_t', 'secvit_s', 'secvit_b' or 'secvit_l'; null when `model_overrides`
                   lists every architecture field.
  num_classes      outputs of the classifier.
  model_overrides  {SecViT field: JSON value} where the model differs from its variant, e.g.
                   {"depths": [1, 1, 2, 1], "drop_path_rate": 0.05}. Only fields that define the
                   model: the compute dtype, remat and dwconv_impl are chosen by whoever loads it.
  image_size       S: the model was trained at S×S and is evaluated on the central S×S crop.
  class_names      (optional) one name per class: a folder's class directories, a TFDS dataset's
                   label names (ImageNet's synsets), '0'..'9' for the digits.
  source           (optional) where the weights come from: the release file, 'trained on <data>'.
  ema              (optional, converted checkpoints) whether they are the release's `model_ema`.
  task_settings    (optional) what a task's model holds besides the SecViT backbone, as its
                   builder and `predict` read it: segmentation's {"head": {...}, "eval_scale":
                   [long, short]} (`image_size` is then the evaluation's shorter side),
                   detection's detector, its settings and the evaluation transform
                   (`tasks/detection.py`).
A model.json from before task, model_overrides and image_size existed reads with their defaults
('classification', {}, 224). A workdir from before model.json is described by its config.json.

`tasks.load_model(path)` (`secvit_jax.load_model`) builds the model that model.json describes and
reads its variables (`load_variables`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from typing import Any, Mapping, Sequence

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from secvit_jax import files
from secvit_jax import model as model_lib

VARIABLES_ITEM = 'variables'
EMA_VARIABLES_ITEM = 'ema_variables'
OPT_STATE_ITEM = 'opt_state'
METADATA_FILE = 'model.json'
CONFIG_FILE = 'config.json'
CHECKPOINTS_DIR = 'checkpoints'
# The task of a model.json from before tasks existed.
DEFAULT_TASK = 'classification'
DEFAULT_IMAGE_SIZE = 224
# SecViT fields that say how to run a model, not what it is: chosen when loading, never recorded.
RUNTIME_FIELDS = ('dtype', 'dwconv_impl', 'remat', 'attention_impl')


# ------------------------------------------------------------------------------------------------
# Variables.
# ------------------------------------------------------------------------------------------------


def save_variables(directory: str, variables: Mapping[str, Any],
                   metadata: Mapping[str, Any]) -> None:
  """Writes `variables` ({'params', 'batch_stats'}) and `metadata` (model.json, e.g.
  `ModelInfo.to_json()`) into a new `directory`."""
  directory = os.path.abspath(directory)
  os.makedirs(directory)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, VARIABLES_ITEM), dict(variables))
    checkpointer.wait_until_finished()
  with open(os.path.join(directory, METADATA_FILE), 'w') as f:
    f.write(format_json(metadata))


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
# Model overrides: SecViT fields beyond a variant.
# ------------------------------------------------------------------------------------------------


def architecture_fields(variant: str | None = None) -> dict[str, Any]:
  """The SecViT fields that define a model besides its classes, with `variant`'s values (SecViT's
  defaults without one)."""
  fields = {field.name: field.default for field in dataclasses.fields(model_lib.SecViT)
            if field.name not in ('num_classes', 'parent', 'name', *RUNTIME_FIELDS)}
  if variant is not None:
    if variant not in model_lib.VARIANTS:
      raise ValueError(f'unknown SecViT variant {variant!r}; choose one of '
                       f'{sorted(model_lib.VARIANTS)}')
    fields.update(model_lib.VARIANTS[variant])
  return fields


def check_model_overrides(variant: str | None, overrides: Mapping[str, Any]) -> dict[str, Any]:
  """`overrides` of `variant`'s architecture fields, type-checked, with sequences as tuples.

  Args:
    variant: the variant they modify, or None for SecViT's defaults.
    overrides: field -> value, as Python or JSON values (lists for sequences).

  Raises:
    ValueError: one line naming an unknown field (with the nearest field name), a field chosen
      when loading (dtype, ...), a value of the wrong type, or a per-stage field with fewer
      values than `depths` has stages.
  """
  base = architecture_fields(variant)
  checked = {}
  for name, value in overrides.items():
    if name not in base:
      raise ValueError(_not_a_field(name, base))
    checked[name] = _as_type_of(name, value, base[name])
  fields = {**base, **checked}
  stages = len(fields['depths'])  # The model reads the other per-stage fields up to here.
  # An empty tuple where the default is empty means "none" (tokens_per_cluster: keep the counts).
  short = [f'{name} has {len(value)}' for name, value in fields.items()
           if isinstance(value, tuple) and len(value) < stages and (value or base[name] != ())]
  if short:
    raise ValueError(f'per-stage fields need a value for each of the {stages} stages of depths, '
                     f'but {", ".join(short)}')
  return checked


def _not_a_field(name: str, fields: Mapping[str, Any]) -> str:
  if name in RUNTIME_FIELDS:
    return (f'{name} is chosen when a model is loaded (load_model(..., {name}=...)), not recorded '
            'with its weights')
  if name == 'num_classes':
    return 'num_classes is not an override: it is the size of the checkpoint\'s head'
  nearest = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.5)
  hint = f' (did you mean {nearest[0]!r}?)' if nearest else f'; fields are {sorted(fields)}'
  return f'unknown SecViT field {name!r}{hint}'


def _as_type_of(name: str, value: Any, default: Any) -> Any:
  """`value` as a value of the type of `default` (tuples of its element type for sequences).

  A default that shows no type (None, an empty sequence) takes any value, lists as tuples.
  """
  if default is None or (isinstance(default, (tuple, list)) and not default):
    return tuple(value) if isinstance(value, list) else value
  if isinstance(default, (tuple, list)):
    if isinstance(value, (tuple, list)) and all(_fits(item, default[0]) for item in value):
      return tuple(float(v) if isinstance(default[0], float) else v for v in value)
    example = ','.join(json.dumps(item) for item in default)
    raise ValueError(f'{name} takes one {type(default[0]).__name__} per stage, e.g. {example}; '
                     f'got {value!r}')
  if not _fits(value, default):
    kind = type(default).__name__
    raise ValueError(f'{name} takes {"an" if kind[0] in "aeiou" else "a"} {kind} such as '
                     f'{default!r}; got {value!r}')
  return float(value) if isinstance(default, float) else value


def _fits(value: Any, default: Any) -> bool:
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(default, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float))
  return isinstance(value, type(default))


def _to_json(value: Any) -> Any:
  if isinstance(value, (tuple, list)):
    return [_to_json(item) for item in value]
  return value.item() if isinstance(value, np.generic) else value


def model_overrides_json(variant: str | None, fields: Mapping[str, Any]) -> dict[str, Any]:
  """The architecture `fields` whose values differ from `variant`'s, as JSON values (every one
  of them without a variant). `fields` may hold others (e.g. RUNTIME_FIELDS): they are left out."""
  base = architecture_fields(variant)
  return {name: _to_json(value) for name, value in fields.items()
          if name in base and (variant is None or _to_json(value) != _to_json(base[name]))}


# ------------------------------------------------------------------------------------------------
# model.json.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """What a checkpoint's variables are: the contents of its model.json (see the module doc)."""
  variant: str | None
  num_classes: int
  task: str = DEFAULT_TASK
  model_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # JSON values.
  image_size: int = DEFAULT_IMAGE_SIZE
  class_names: tuple[str, ...] | None = None
  source: str | None = None
  ema: bool | None = None
  task_settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # JSON values.

  def to_json(self) -> dict[str, Any]:
    data = {'task': self.task, 'variant': self.variant, 'num_classes': self.num_classes,
            'model_overrides': dict(self.model_overrides), 'image_size': self.image_size}
    optional = {'class_names': list(self.class_names) if self.class_names else None,
                'source': self.source, 'ema': self.ema,
                'task_settings': dict(self.task_settings) if self.task_settings else None}
    return {**data, **{key: value for key, value in optional.items() if value is not None}}

  @classmethod
  def from_json(cls, data: Mapping[str, Any], where: str) -> ModelInfo:
    """Reads a model.json object; `where` names it in errors (ValueError, one line)."""
    keys = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - keys)
    missing = sorted({'variant', 'num_classes'} - set(data))
    if unknown or missing:
      raise ValueError(f'{where}: ' + '; '.join(
          ([f'unknown keys {unknown} (written by a newer secvit_jax?)'] if unknown else []) +
          ([f'lacks {missing}'] if missing else [])))
    names = data.get('class_names')
    info = cls(**{**data, 'class_names': tuple(names) if names is not None else None})
    if names is not None and len(names) != info.num_classes:
      raise ValueError(f'{where}: {len(names)} class_names for {info.num_classes} classes')
    return info


def model_info_from_config(config: Any, dataset_info: Any, *, task: str,
                           image_size: int | None = None,
                           task_settings: Mapping[str, Any] | None = None) -> ModelInfo:
  """The model.json of a training run of any task.

  Args:
    config: the run's ml_collections config (`model`, `dataset`, and `image_size` unless given).
    dataset_info: the `data.sources.DatasetInfo` of its data (num_classes, class_names).
    task: the task's name; image_size, task_settings: a dense task's (see `ModelInfo`).
  """
  return _training_info(config.model.to_dict(),
                        config.image_size if image_size is None else image_size,
                        config.get('dataset'), dataset_info.num_classes,
                        dataset_info.class_names, task=task, task_settings=task_settings)


def _training_info(model_config: Mapping[str, Any], image_size: int, dataset: str | None,
                   num_classes: int, class_names: tuple[str, ...] | None, *,
                   task: str = DEFAULT_TASK,
                   task_settings: Mapping[str, Any] | None = None) -> ModelInfo:
  fields = {name: value for name, value in model_config.items()
            if name != 'name' and name not in RUNTIME_FIELDS}
  variant = model_config['name']
  overrides = check_model_overrides(variant, fields)
  return ModelInfo(variant=variant, num_classes=num_classes, task=task,
                   model_overrides=model_overrides_json(variant, overrides),
                   image_size=int(image_size),
                   class_names=tuple(class_names) if class_names else None,
                   source=f'trained on {dataset}' if dataset else None,
                   task_settings=dict(task_settings or {}))


def format_json(data: Mapping[str, Any]) -> str:
  """model.json text: one key per line (nested objects too), each list on one line."""
  def format_value(value, indent):
    if isinstance(value, Mapping) and value:
      items = [f'{indent}  {json.dumps(key)}: {format_value(item, indent + "  ")}'
               for key, item in value.items()]
      return '{\n' + ',\n'.join(items) + f'\n{indent}}}'
    return json.dumps(value)
  return format_value(dict(data), '') + '\n'


def write_model_info(directory: str | os.PathLike, info: ModelInfo) -> None:
  """Writes DIRECTORY/model.json atomically (`files.write_text`)."""
  files.write_text(as_path(directory) / METADATA_FILE, format_json(info.to_json()))


def read_model_info(path: str | os.PathLike, *, step: int | None = None) -> ModelInfo:
  """The `ModelInfo` of the checkpoint that `path` (and `step`) designate.

  Read from the model.json of a converted checkpoint or of the training workdir that holds the
  checkpoint; for a workdir without one, from its config.json (the classes: the head's size).

  Raises:
    FileNotFoundError: no checkpoint, or nothing that says what model it holds.
    ValueError: a model.json that cannot be read.
  """
  directory = checkpoint_directory(path, step)
  if (directory / METADATA_FILE).exists():
    return _read_json_info(directory / METADATA_FILE)
  if directory.name.isdigit() and directory.parent.name == CHECKPOINTS_DIR:
    workdir = directory.parent.parent
    if (workdir / METADATA_FILE).exists():
      return _read_json_info(workdir / METADATA_FILE)
    if (workdir / CONFIG_FILE).exists():
      return _info_from_config_json(workdir / CONFIG_FILE, directory / VARIABLES_ITEM)
  raise FileNotFoundError(f'{path}: no {METADATA_FILE} says which model its variables belong to')


def _read_json_info(path: epath.Path) -> ModelInfo:
  try:
    data = json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise ValueError(f'{path}: not valid JSON ({error})') from None
  return ModelInfo.from_json(data, str(path))


def _info_from_config_json(path: epath.Path, variables: epath.Path) -> ModelInfo:
  """The ModelInfo of a workdir from before model.json, from its config.json and its head."""
  config = json.loads(path.read_text())
  handler = ocp.PyTreeCheckpointHandler()
  try:
    num_classes = handler.metadata(variables).tree['params']['head']['bias'].shape[0]
  finally:
    handler.close()
  return _training_info(config['model'], config['image_size'], config.get('dataset'),
                        num_classes, None)


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
