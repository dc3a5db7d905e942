"""The task interface: everything the trainer (`train_lib`), `load_model` and `secvit-predict` do
not know about a kind of model.

A task (classification, segmentation, detection) is a `Task` subclass in a module of this package,
registered in `tasks.TASKS` (its one line there), with its data under `secvit_jax/data/`. The
trainer owns the state, optimizer, EMA, mesh, checkpoints and loop, and calls only this:

  on the host, before training
    create_data(config)             the task's data (`data.pipeline.Data`), opened once
    Task(config, info)              `info`: the data's `DatasetInfo` (classes, sizes)
    model_info()                    WORKDIR/model.json: what the checkpoints hold
    create_model()                  the Flax module: `build_model(model_info())`
    init_inputs()                   arrays for `model.init`
    abstract_train_batch(size)      ShapeDtypeStructs of a global training batch
    load_pretrained(variables, loaded, source)   what `config.init_from` fills
  inside the jitted steps (pure functions of arrays)
    loss(model, params, model_state, batch, rng) -> (loss, (metrics, new model_state))
    eval_outputs(model, variables, batch) -> outputs of one evaluation batch
  on the host, after each evaluation batch
    create_evaluator(...) -> `evaluation.base.Evaluator`: add(outputs) per batch, result()
    best_metric                     the result (higher is better) that keeps the best checkpoint

From a checkpoint's model.json alone (`checkpoints.ModelInfo`), without a config:
    build_model(info, dtype=..., **overrides)   the model: the one constructor, training's too
                                                (`tasks.load_model` calls it)
    prepare_images(images, info)    `secvit-predict`: decoded images as `predict` takes them
    predict(model, variables, info, images, options) -> one JSON-able result per image
    show(path, result, options)     a result as text (pictures are written by `predict`)
  `secvit-export` (traced into the exported graph; `secvit_jax.serving`):
    serving_size(info)              the (H, W) an export runs at unless told
    serving_preprocess(pixels, size, info)   uint8 images of any size -> (model input, Geometry)
    serving_outputs(model, variables, info, images, geometry, output_size) -> named outputs
    export_limits                   {format: why this task's model cannot be exported in it}

`variables` are {'params': ..., **model_state}, model_state being the model's other collections
(e.g. {'batch_stats': ...}).

The task modules import TensorFlow (the data) only inside the methods that read data, so that
`load_model` stays free of it.
"""

from __future__ import annotations

import abc
import argparse
import difflib
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, TypeVar

from etils import epath
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from secvit_jax import checkpoints
from secvit_jax import model as model_lib
from secvit_jax import serving
from secvit_jax.evaluation import base as evaluation

if TYPE_CHECKING:
  from secvit_jax.data import pipeline
  from secvit_jax.data import sources

Batch = dict[str, jax.Array]  # `data.pipeline.Batch`: named arrays of a global batch.
Metrics = dict[str, jax.Array]  # Named scalars or arrays, computed on the devices.
Variables = dict[str, Any]
Registered = TypeVar('Registered')


def lookup(registry: Mapping[str, Registered], name: str, field: str, kind: str) -> Registered:
  """`registry[name]` (`TASKS`, `detectors.DETECTORS`).

  Raises:
    ValueError: naming the unknown `name` as the config `field` gave it, the closest known name
      and every known one (`kind`: what they are).
  """
  if name not in registry:
    close = difflib.get_close_matches(name, registry, n=1)
    hint = f'; did you mean {close[0]!r}?' if close else ''
    raise ValueError(f'unknown {field} {name!r}{hint} ({kind}: {", ".join(sorted(registry))})')
  return registry[name]


def secvit_fields(info: checkpoints.ModelInfo, overrides: Mapping[str, Any]) -> dict[str, Any]:
  """The SecViT fields of `info`'s model (its checked `model_overrides`), `overrides` (fields to
  run it with, e.g. `remat`, `dwconv_impl`) replacing them."""
  return {**checkpoints.check_model_overrides(info.variant, info.model_overrides), **overrides}


def build_backbone(info: checkpoints.ModelInfo, dtype: Any, overrides: Mapping[str, Any],
                   **settings: Any) -> model_lib.SecViTBackbone:
  """The SecViT backbone of a dense task's `info` (variant None: SecViT's defaults), with
  `overrides` (`secvit_fields`) and the task's `settings` (out_indices, output_norm...)."""
  fields = {**secvit_fields(info, overrides), **settings}
  if info.variant is None:
    return model_lib.SecViTBackbone(dtype=dtype, **fields)
  return model_lib.create_backbone(info.variant, dtype=dtype, **fields)


class Task(abc.ABC):
  """One kind of model; see the module docstring for who calls what, and when.

  Class attributes:
    name: the `config.task` that selects it.
    best_metric: the evaluator result that keeps the best checkpoint (higher is better).
    reinitialized_on_mismatch: variable paths ('params/head/', ...) that `load_pretrained` leaves
      freshly initialized when the checkpoint's shape differs (e.g. another number of classes).
    export_limits: export formats ('saved_model', 'onnx') whose converter cannot express the
      task's model, each with the reason (`secvit-export` refuses them with it).
  """
  name: ClassVar[str]
  best_metric: ClassVar[str]
  reinitialized_on_mismatch: ClassVar[tuple[str, ...]] = ()
  export_limits: ClassVar[Mapping[str, str]] = {}

  def __init__(self, config: ml_collections.ConfigDict, info: sources.DatasetInfo):
    self.config = config
    self.info = info

  @staticmethod
  @abc.abstractmethod
  def create_data(config: ml_collections.ConfigDict) -> pipeline.Data:
    """The task's data for `config`, read by this process."""

  @classmethod
  @abc.abstractmethod
  def build_model(cls, info: checkpoints.ModelInfo, *, dtype: Any = jnp.float32,
                  **overrides: Any) -> nn.Module:
    """The model a model.json of this task describes, computing in `dtype`; `overrides` (SecViT
    fields, e.g. `checkpoints.RUNTIME_FIELDS`) replace what it records of the SecViT."""

  @abc.abstractmethod
  def model_info(self) -> checkpoints.ModelInfo:
    """What the run's checkpoints hold (WORKDIR/model.json): everything `build_model` needs."""

  def create_model(self) -> nn.Module:
    """The model of `model_info()`, run as `config.model` says (its `checkpoints.RUNTIME_FIELDS`)
    and computing in `config.dtype`."""
    runtime = {name: value for name, value in self.config.model.items()
               if name in checkpoints.RUNTIME_FIELDS}
    return self.build_model(self.model_info(), dtype=jnp.dtype(self.config.dtype), **runtime)

  @abc.abstractmethod
  def init_inputs(self) -> tuple[jax.Array, ...]:
    """Positional inputs of `model.init` (a batch of one), before `train=False`."""

  @abc.abstractmethod
  def abstract_train_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes and dtypes of a global training batch of `batch_size` examples."""

  @abc.abstractmethod
  def loss(self, model: nn.Module, params: Any, model_state: Variables, batch: Batch,
           rng: jax.Array) -> tuple[jax.Array, tuple[Metrics, Variables]]:
    """The training loss of `batch` and (metrics to log besides it, the new model state).

    Traced inside the jitted train step; `rng` is the step's key (folded from the seed and the
    step), for augmentation on the device and stochastic depth.
    """

  @abc.abstractmethod
  def eval_outputs(self, model: nn.Module, variables: Variables, batch: Batch) -> Metrics:
    """What one evaluation batch (with its 'mask' of real examples) contributes to the metrics;
    traced inside the jitted eval step."""

  @abc.abstractmethod
  def create_evaluator(self, *, workdir: epath.Path | None, step: int,
                       prefix: str) -> evaluation.Evaluator:
    """A fresh evaluator for one model's evaluation at `step`; results are logged as
    '{prefix}/{name}' and files, if the task writes any, go under `workdir`."""

  def load_pretrained(self, variables: Variables, loaded: Mapping[str, Any],
                      source: str) -> tuple[Variables, list[str]]:
    """`variables` with every array replaced by its namesake in `loaded` (host arrays), and notes
    on what was not loaded.

    Returns:
      (variables whose loaded leaves are NumPy arrays and whose other leaves are those of
      `variables`, unchanged; the notes for the log).

    Raises:
      ValueError: naming every missing, extra or mis-shaped array, except those under
        `reinitialized_on_mismatch`, which keep their initialization when their shape differs.
    """
    current = flax.traverse_util.flatten_dict(variables, sep='/')
    incoming = flax.traverse_util.flatten_dict(dict(loaded), sep='/')
    merged, kept, problems = {}, [], []
    for name, value in current.items():
      if name not in incoming:
        problems.append(f'{name} is missing')
      elif incoming[name].shape == value.shape:
        merged[name] = np.asarray(incoming[name], dtype=value.dtype)
      elif name.startswith(self.reinitialized_on_mismatch):
        kept.append(f'{name} {value.shape} (checkpoint {incoming[name].shape})')
        merged[name] = value
      else:
        problems.append(f'{name} has shape {incoming[name].shape}, the model {value.shape}')
    problems += [f'{name} is not in the model' for name in sorted(set(incoming) - set(current))]
    if problems:
      raise ValueError(f'init_from {source} does not fit the model: ' + '; '.join(problems))
    notes = ['newly initialized (shape differs): ' + ', '.join(kept)] if kept else []
    return flax.traverse_util.unflatten_dict(merged, sep='/'), notes

  # `secvit-predict` (on the host; `options` are its parsed arguments: images (the paths), top,
  # batch_size, output_dir, min_score...).

  @classmethod
  @abc.abstractmethod
  def prepare_images(cls, images: list[np.ndarray],
                     info: checkpoints.ModelInfo) -> tuple[Any, str]:
    """Decoded uint8 (H, W, 3) images -> (what `predict` takes, what the model sees, for the
    log)."""

  @classmethod
  @abc.abstractmethod
  def predict(cls, model: nn.Module, variables: Variables, info: checkpoints.ModelInfo,
              images: Any, options: argparse.Namespace) -> list[dict[str, Any]]:
    """One JSON-able result per image (a task that draws pictures writes them here)."""

  @classmethod
  @abc.abstractmethod
  def show(cls, path: str, result: dict[str, Any], options: argparse.Namespace) -> str:
    """One image's result as text for people."""

  # `secvit-export` (traced into the exported graph: sizes may be symbolic; see
  # `secvit_jax.serving` and `secvit_jax.export`).

  @classmethod
  def serving_size(cls, info: checkpoints.ModelInfo) -> tuple[int, int]:
    """The (H, W) an export runs at by default: the evaluation size, `image_size`²."""
    return info.image_size, info.image_size

  @classmethod
  @abc.abstractmethod
  def serving_preprocess(cls, pixels: jax.Array, size: tuple[int, int],
                         info: checkpoints.ModelInfo) -> tuple[jax.Array, serving.Geometry]:
    """uint8 (B, h, w, 3) images -> (the model input at `size`, where they lie on it), as the
    task's evaluation transforms images."""

  @classmethod
  @abc.abstractmethod
  def serving_outputs(cls, model: nn.Module, variables: Variables, info: checkpoints.ModelInfo,
                      images: jax.Array, geometry: serving.Geometry,
                      output_size: tuple[Any, Any]) -> serving.Outputs:
    """What a served model returns for a batch of model inputs: named arrays of fixed shapes
    (but the batch); `output_size` is the (height, width) per-pixel outputs are reported at."""
