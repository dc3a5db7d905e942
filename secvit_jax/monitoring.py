"""What a training run reports and how it stops: metric files, the progress line, the non-finite
loss check, and the signals that end a run with a checkpoint.

Workdir files written here (process 0 only): metrics.jsonl (one JSON object per line, each with
'step') and tensorboard/ (the same scalars) for training; evaluations.jsonl for `eval_only` runs,
kept apart so that curves and the best-checkpoint logic only ever see training.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any, Mapping

from absl import logging
from etils import epath
import jax
import numpy as np

Metrics = dict[str, jax.Array]  # A train step's metrics, on the devices.


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite; nothing was saved after the last finite step."""


class Stopped(Exception):
  """A signal (SIGTERM, a preemption notice, Ctrl-C) stopped training after a checkpoint of the
  current step was saved. `exit_status` is the shell's for that signal (143, 130)."""

  def __init__(self, message: str, signal_number: int):
    super().__init__(message)
    self.exit_status = 128 + signal_number


# ------------------------------------------------------------------------------------------------
# Metric files.
# ------------------------------------------------------------------------------------------------


class MetricWriter:
  """Scalars into WORKDIR/metrics.jsonl (a JSON object with 'step' per line) and TensorBoard
  (WORKDIR/tensorboard, as `tf.summary` scalars without needing the tensorboard package). Only
  process 0 writes."""

  def __init__(self, workdir: epath.Path):
    self._enabled = jax.process_index() == 0
    if self._enabled:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
      self._tf = tf
      # What TensorBoard's scalars plugin reads (what `tf.summary.scalar` writes).
      self._scalar_metadata = summary_pb2.SummaryMetadata(
          plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name='scalars'))
      self._summary = tf.summary.create_file_writer(str(workdir / 'tensorboard'))
      self._jsonl = (workdir / 'metrics.jsonl').open('a')

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._enabled:
      return
    self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self._jsonl.flush()
    with self._summary.as_default(step=step):
      for name, value in scalars.items():
        self._tf.summary.write(name, self._tf.constant(value, self._tf.float32),
                               metadata=self._scalar_metadata)
    self._summary.flush()

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._summary.close()


def record_evaluation(workdir: epath.Path, record: Mapping[str, Any]) -> None:
  """Appends an `eval_only` result to WORKDIR/evaluations.jsonl (process 0 only)."""
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    with (workdir / 'evaluations.jsonl').open('a') as f:
      f.write(json.dumps(dict(record)) + '\n')


def results_line(results: Mapping[str, float]) -> str:
  return ' | '.join(f'{name} {value:.4f}' for name, value in results.items())


# ------------------------------------------------------------------------------------------------
# Training progress.
# ------------------------------------------------------------------------------------------------


def progress_line(step: int, total_steps: int, summary: Mapping[str, float]) -> str:
  """'step 100/1000 | loss 2.3012 | lr 0.001 | 1234.5 img/s (154.3 per device) | ETA 1h02m03s'."""
  parts = [f'step {step}/{total_steps}', f'loss {summary["train/loss"]:.4f}',
           f'lr {summary["train/lr"]:.3g}']
  if 'train/images_per_second' in summary:
    eta = int(summary['train/eta_seconds'])
    parts += [f'{summary["train/images_per_second"]:.1f} img/s '
              f'({summary["train/images_per_second_per_device"]:.1f} per device)',
              f'ETA {eta // 3600}h{eta % 3600 // 60:02d}m{eta % 60:02d}s']
  return ' | '.join(parts)


class TrainMetrics:
  """Collects each step's device metrics without waiting for them; `check` and `summarize` fetch
  them (the loop's only host syncs) and stop at the first step whose loss is not finite.

  A step's metrics hold 'loss', 'grad_norm', 'lr', 'finite' and any the task adds; the summary
  averages all but 'lr' (the last) and 'finite'.
  """

  def __init__(self, total_steps: int, batch_size: int):
    self._total_steps = total_steps
    self._batch_size = batch_size
    self._pending: list[tuple[int, Metrics]] = []
    self._fetched: list[tuple[int, dict[str, np.ndarray]]] = []
    self.restart_clock()

  def add(self, step: int, metrics: Metrics) -> None:
    self._pending.append((step, metrics))
    self._timed_steps += 1

  def restart_clock(self) -> None:
    """Times the speed from now on (e.g. after compilation)."""
    self._interval_start = time.perf_counter()
    self._paused_seconds = 0.0
    self._timed_steps = 0

  def pause(self, seconds: float) -> None:
    """Leaves `seconds` (evaluation, checkpointing) out of the speed."""
    self._paused_seconds += seconds

  def check(self) -> None:
    """Raises NonFiniteLossError naming the first step whose loss or gradient is not finite."""
    for step, metrics in jax.device_get(self._pending):
      if not metrics['finite']:
        raise NonFiniteLossError(
            f'the training loss is {float(metrics["loss"])} (gradient norm '
            f'{float(metrics["grad_norm"])}) at step {step}: training stopped, nothing was saved '
            'after the last finite step')
      self._fetched.append((step, metrics))
    self._pending.clear()

  def summarize(self) -> dict[str, float]:
    """Means of the step metrics since the last summary, the last learning rate, the speed."""
    self.check()
    fetched, timed_steps = self._fetched, self._timed_steps
    seconds = time.perf_counter() - self._interval_start - self._paused_seconds
    self._fetched = []
    self.restart_clock()
    names = [name for name in fetched[-1][1] if name not in ('lr', 'finite')]
    summary = {f'train/{name}': float(np.mean([m[name] for _, m in fetched])) for name in names}
    summary['train/lr'] = float(fetched[-1][1]['lr'])
    if timed_steps:  # Not when the interval is only the step that compiled.
      images_per_second = timed_steps * self._batch_size / seconds
      summary.update({
          'train/images_per_second': images_per_second,
          'train/images_per_second_per_device': images_per_second / jax.device_count(),
          'train/eta_seconds': (self._total_steps - fetched[-1][0]) * seconds / timed_steps,
      })
    return summary


# ------------------------------------------------------------------------------------------------
# Stopping on a signal.
# ------------------------------------------------------------------------------------------------


class StopSignals:
  """Whether to checkpoint and stop. With one process: SIGTERM (a TPU VM's preemption notice) or
  Ctrl-C (SIGINT); with several, JAX's preemption sync point, where every process must ask at
  every step (`should_stop(step)`), and Ctrl-C keeps Python's default.

  A second Ctrl-C stops the process at once (status 130) without saving. Python runs signal
  handlers only between bytecodes, which may be tens of seconds away while XLA compiles or a step
  runs; a thread that reads the signal wake-up pipe (`signal.set_wakeup_fd`) sees each signal as it
  arrives, so the second Ctrl-C takes effect immediately, and no KeyboardInterrupt is ever raised
  inside a compilation or a device call (where it once ended in a segmentation fault).
  """

  def __init__(self, preemption_sync: Any):
    """`preemption_sync`: has `reached_preemption(step)` (an orbax CheckpointManager)."""
    self._preemption_sync = preemption_sync
    self._signal: int | None = None
    self._previous: dict[int, Any] = {}
    self._write_fd: int | None = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._read_fd, self._write_fd = os.pipe()
      os.set_blocking(self._write_fd, False)
      self._previous_wakeup_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
      for number in (signal.SIGTERM, signal.SIGINT):
        # The Python-level handlers only keep the default actions off; the watcher decides.
        self._previous[number] = signal.signal(number, lambda *_: None)
      threading.Thread(target=self._watch, name='stop-signals', daemon=True).start()

  def _watch(self) -> None:
    while True:
      received = os.read(self._read_fd, 64)
      if not received:  # close() closed the pipe's other end.
        os.close(self._read_fd)
        return
      for number in received:
        if number == signal.SIGINT and self._signal == signal.SIGINT:
          logging.warning('second Ctrl-C: stopping now, without saving')
          logging.flush()
          os._exit(128 + signal.SIGINT)  # pylint: disable=protected-access
        if number in (signal.SIGTERM, signal.SIGINT) and self._signal is None:
          self._signal = number
          logging.warning('%s: saving a checkpoint after the current step, then stopping%s',
                          signal.Signals(number).name,
                          ' (Ctrl-C again: stop now without saving)'
                          if number == signal.SIGINT else '')

  def should_stop(self, step: int) -> bool:
    return self._preemption_sync.reached_preemption(step) or self._signal is not None

  @property
  def signal_number(self) -> int:
    """The signal that stopped the run (SIGTERM for a preemption of several processes)."""
    return self._signal or signal.SIGTERM

  @property
  def signal_name(self) -> str:
    return signal.Signals(self.signal_number).name

  def close(self) -> None:
    if self._write_fd is None:
      return
    for number, handler in self._previous.items():
      signal.signal(number, handler)
    signal.set_wakeup_fd(self._previous_wakeup_fd)
    os.close(self._write_fd)  # The watcher sees the end of the pipe and closes its end.
    self._write_fd = None
