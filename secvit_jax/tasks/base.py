"""The task interface: everything the trainer (`train_lib`) does not know about a kind of training.

A task (classification, segmentation, detection...) is a `Task` subclass in a module of this
package, registered in `tasks/__init__.py`, with its data under `secvit_jax/data/`. The trainer
owns the state, optimizer, EMA, mesh, checkpoints and loop, and calls only this:

  on the host, before training
    create_data(config)             the task's data (`data.pipeline.Data`), opened once
    Task(config, info)              `info`: the data's `DatasetInfo` (classes, sizes)
    create_model()                  the Flax module
    init_inputs()                   arrays for `model.init`
    abstract_train_batch(size)      ShapeDtypeStructs of a global training batch
    load_pretrained(variables, loaded, source)   what `config.init_from` fills
    model_info()                    WORKDIR/model.json: what the checkpoints hold
  inside the jitted steps (pure functions of arrays)
    loss(model, params, model_state, batch, rng) -> (loss, (metrics, new model_state))
    eval_outputs(model, variables, batch) -> outputs of one evaluation batch
  on the host, after each evaluation batch
    create_evaluator(...) -> Evaluator: add(outputs) per batch, result() -> {name: float}
    best_metric                     the result (higher is better) that keeps the best checkpoint

`variables` are {'params': ..., **model_state}, model_state being the model's other collections
(e.g. {'batch_stats': ...}).
"""

from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar, Mapping

from etils import epath
import flax
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from secvit_jax import checkpoints
from secvit_jax.data import pipeline
from secvit_jax.data import sources

Batch = pipeline.Batch
Metrics = dict[str, jax.Array]  # Named scalars or arrays, computed on the devices.
Variables = dict[str, Any]


def model_fields(config: ml_collections.ConfigDict) -> tuple[str, dict[str, Any]]:
  """(`config.model.name`, every other field of `config.model` as a model override), lists as
  tuples (Flax module fields must be hashable)."""
  fields = config.model.to_dict()
  name = fields.pop('name')
  return name, {key: tuple(value) if isinstance(value, list) else value
                for key, value in fields.items()}


class Evaluator(abc.ABC):
  """Accumulates the outputs of one model's evaluation, batch after batch, into its metrics."""

  @abc.abstractmethod
  def add(self, outputs: Mapping[str, jax.Array]) -> None:
    """Takes one batch's `Task.eval_outputs` (replicated arrays, possibly still computing)."""

  @abc.abstractmethod
  def result(self) -> dict[str, float]:
    """The metrics over every batch added."""


class SumEvaluator(Evaluator):
  """Sums each output over the batches, then `finalize(sums)`. The sums are fetched from the
  devices every `fetch_every` batches, so evaluation never waits on a batch, and added up in
  float64 / int64 on the host (exact counts however large the split)."""

  def __init__(self, finalize: Callable[[dict[str, np.ndarray]], dict[str, float]],
               fetch_every: int = 64):
    self._finalize = finalize
    self._fetch_every = fetch_every
    self._pending: list[Mapping[str, jax.Array]] = []
    self._sums: dict[str, np.ndarray] = {}

  def add(self, outputs):
    self._pending.append(outputs)
    if len(self._pending) >= self._fetch_every:
      self._fetch()

  def _fetch(self) -> None:
    for outputs in jax.device_get(self._pending):
      for name, value in outputs.items():
        value = np.asarray(value)
        value = value.astype(np.int64 if np.issubdtype(value.dtype, np.integer) else np.float64)
        self._sums[name] = self._sums[name] + value if name in self._sums else value
    self._pending = []

  def result(self):
    self._fetch()
    return self._finalize(self._sums)


class Task(abc.ABC):
  """One kind of training; see the module docstring for who calls what, and when.

  Class attributes:
    name: the `config.task` that selects it.
    best_metric: the evaluator result that keeps the best checkpoint (higher is better).
    reinitialized_on_mismatch: variable paths ('params/head/', ...) that `load_pretrained` leaves
      freshly initialized when the checkpoint's shape differs (e.g. another number of classes).
  """
  name: ClassVar[str]
  best_metric: ClassVar[str]
  reinitialized_on_mismatch: ClassVar[tuple[str, ...]] = ()

  def __init__(self, config: ml_collections.ConfigDict, info: sources.DatasetInfo):
    self.config = config
    self.info = info

  @staticmethod
  @abc.abstractmethod
  def create_data(config: ml_collections.ConfigDict) -> pipeline.Data:
    """The task's data for `config`, read by this process."""

  @abc.abstractmethod
  def create_model(self) -> nn.Module:
    """The model, built from `config.model` and the data's classes."""

  @abc.abstractmethod
  def model_info(self) -> checkpoints.ModelInfo:
    """What the run's checkpoints hold (WORKDIR/model.json), for `checkpoints.load_model`; its
    task needs a builder in `checkpoints.MODEL_BUILDERS`."""

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
                       prefix: str) -> Evaluator:
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
