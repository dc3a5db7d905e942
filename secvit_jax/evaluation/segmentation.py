"""Semantic segmentation's metrics: a (classes × classes) confusion matrix per batch on the
devices, summed exactly over the split, and mmseg's mIoU / aAcc / mAcc of it on the host."""

from __future__ import annotations

import json
from typing import Any, Mapping, Protocol, Sequence

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from secvit_jax import files
from secvit_jax.evaluation import base


def confusion_matrix(labels: jax.Array, predictions: jax.Array, valid: jax.Array,
                     num_classes: int) -> jax.Array:
  """int32 (C, C): [true class, predicted class] pixel counts over the `valid` pixels."""
  index = jnp.where(valid, labels * num_classes + predictions, num_classes * num_classes)
  counts = jnp.bincount(index.ravel(), length=num_classes * num_classes + 1)
  return counts[:-1].reshape(num_classes, num_classes).astype(jnp.int32)


def confusion_metrics(confusion: np.ndarray) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """mmseg's (and scenic's) metrics of a split's confusion matrix [true, predicted].

  Returns:
    ({'mIoU', 'aAcc', 'mAcc'} as fractions; mIoU and mAcc are means over the classes with a
    non-empty union (IoU) or with labelled pixels (accuracy), the others NaN and skipped),
    per class: {'iou', 'accuracy' (NaN where skipped), 'pixels' (labelled), 'predicted'}.
  """
  confusion = np.asarray(confusion, np.float64)
  intersection = np.diag(confusion)
  pixels, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
  union = pixels + predicted - intersection
  with np.errstate(divide='ignore', invalid='ignore'):
    iou = np.where(union > 0, intersection / union, np.nan)
    accuracy = np.where(pixels > 0, intersection / pixels, np.nan)
  total = pixels.sum()
  summary = {
      'mIoU': float(np.nanmean(iou)) if np.any(union > 0) else float('nan'),
      'aAcc': float(intersection.sum() / total) if total else float('nan'),
      'mAcc': float(np.nanmean(accuracy)) if np.any(pixels > 0) else float('nan'),
  }
  return summary, {'iou': iou, 'accuracy': accuracy, 'pixels': pixels.astype(np.int64),
                   'predicted': predicted.astype(np.int64)}


class OutputWriter(Protocol):
  """Something that writes each batch's outputs (e.g. predicted label maps) as it goes."""

  def add(self, outputs: Mapping[str, Any]) -> None:
    ...

  def finish(self) -> None:
    ...


class SegmentationEvaluator(base.Evaluator):
  """Sums the batches' confusion matrices exactly (`base.SumEvaluator`: int64 on the host);
  `result` gives mIoU / aAcc / mAcc and writes the per-class JSON (process 0).

  Args:
    class_names: one per class of the confusion matrix.
    per_class_file: where the per-class JSON goes ({**header, mIoU, aAcc, mAcc, 'classes':
      [{'class', 'iou', 'accuracy', 'pixels', 'predicted'}, ...]}), or None.
    header: what that JSON records first (step, model, evaluation mode...).
    writer: also given every batch's outputs, finished after the last.
  """

  def __init__(self, class_names: Sequence[str], per_class_file: epath.Path | None,
               header: Mapping[str, Any], writer: OutputWriter | None = None):
    self._class_names = tuple(class_names)
    self._per_class_file = per_class_file
    self._header = dict(header)
    self._writer = writer
    self._sums = base.SumEvaluator(self._finalize)

  def add(self, outputs):
    self._sums.add({'confusion': outputs['confusion']})
    if self._writer is not None:
      self._writer.add(outputs)

  def result(self):
    results = self._sums.result()
    if self._writer is not None:
      self._writer.finish()
    return results

  def _finalize(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
    summary, per_class = confusion_metrics(sums['confusion'])
    if self._per_class_file is not None and jax.process_index() == 0:
      nan_to_none = lambda x: None if np.isnan(x) else float(x)
      document = {**self._header, **summary, 'classes': [
          {'class': name, 'iou': nan_to_none(per_class['iou'][i]),
           'accuracy': nan_to_none(per_class['accuracy'][i]),
           'pixels': int(per_class['pixels'][i]), 'predicted': int(per_class['predicted'][i])}
          for i, name in enumerate(self._class_names)]}
      files.write_text(self._per_class_file, json.dumps(document, indent=1, allow_nan=False))
    return summary
