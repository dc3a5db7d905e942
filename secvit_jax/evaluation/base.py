"""The evaluator interface: what a task's `create_evaluator` returns to the trainer.

The trainer passes each evaluation batch's outputs (the task's `eval_outputs`: replicated device
arrays, possibly still computing) to `add`, and after the last batch logs `result()`. On several
hosts every host runs the same evaluation: an evaluator whose inputs are global arrays gets the
same sums on each.
"""

from __future__ import annotations

import abc
from typing import Callable, Mapping

import jax
import numpy as np


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
