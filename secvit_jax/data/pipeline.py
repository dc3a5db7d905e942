"""Batching, the same for every task: training batches that resume exactly, evaluation batches that
cover a split once, and their assembly into global jax.Arrays. TensorFlow runs on the host CPU
only (`hide_accelerators_from_tensorflow`).

A task's data (see `Data`) opens a `sources.Source`, takes this process's `Share` of a split and
hands it here with its preprocessing: `preprocess(features, seed)` for training (a stateless seed
per example copy), `preprocess(features)` for evaluation, each mapping a dict of features to a
dict of fixed-shape tensors (image, label, label map, boxes...: whatever moves together).

Determinism and resumption: training batch k of a process is a function of (seed, k,
process_index, process_count). Each process's stream is divided into epochs of `steps_per_epoch`
whole local batches (the examples of the share in a per-epoch seeded order, each repeated
`repeats` times, the last incomplete batch dropped). Every copy is preprocessed with stateless
random ops seeded by (seed, process, epoch, position in the epoch, copy), so resuming at step k
only has to find epoch k // steps_per_epoch and skip to its start: free for indexed shares (the
epoch order is `tf.random.experimental.index_shuffle`, computed per position), and a read of the
records that precede it within that epoch (no decoding) for TFDS, whose epoch order is a seeded
file shuffle and shuffle buffer.

Evaluation: every process yields the same number of batches; the examples missing from a
process's last batches are zeros with 'mask' False.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import itertools
from typing import Any, Callable, Iterator, Protocol

import jax
import numpy as np
import tensorflow as tf

from secvit_jax.data import ops
from secvit_jax.data import sources

HostBatch = dict[str, np.ndarray]
Batch = dict[str, jax.Array]


class Data(Protocol):
  """A task's data: what the trainer reads. Batches are dicts of global jax.Arrays laid out by
  `sharding` along their first (batch) axis."""
  info: sources.DatasetInfo

  def train_batches(self, sharding: jax.sharding.NamedSharding,
                    start_step: int = 0) -> Iterator[Batch]:
    """Endless training batches from global step `start_step` on; batch k is a function of
    (seed, k) for a given number of processes."""

  def eval_batches(self, sharding: jax.sharding.NamedSharding) -> Iterator[Batch]:
    """One pass over the evaluation split, every example once, padding masked by 'mask'."""


@dataclasses.dataclass(frozen=True)
class TrainInput:
  """What a process's training batches are made of: its share of the training split, the
  per-example training transform (`local_train_batches`' `preprocess`) and the copies of each
  example (repeated augmentation; 1 is off)."""
  share: sources.Share
  preprocess: Callable[[sources.Features, tf.Tensor], sources.Features]
  repeats: int = 1


class HostData(abc.ABC):
  """A `Data` whose processes each read their own share on the host (`local_*_batches`, NumPy),
  assembled here into global arrays. Subclasses set `info` and `_config` (its `batch_size`, `seed`
  and `input.prefetch`: global batches kept in flight)."""
  info: sources.DatasetInfo
  _config: Any

  @abc.abstractmethod
  def train_input(self, process_index: int, process_count: int) -> TrainInput:
    """Process `process_index`'s training share and transform (what `local_train_batches`
    batches, and what `benchmarks.input_pipeline` times per example)."""

  def local_train_batches(self, process_index: int, process_count: int,
                          start_step: int = 0) -> Iterator[HostBatch]:
    """This process's part of each training batch (of batch_size / process_count) from global step
    `start_step` on."""
    train = self.train_input(process_index, process_count)
    return local_train_batches(
        train.share, train.preprocess,
        local_batch=local_batch_size(self._config.batch_size, process_count, 'batch_size'),
        seed=self._config.seed, process_index=process_index, start_step=start_step,
        repeats=train.repeats)

  @abc.abstractmethod
  def local_eval_batches(self, process_index: int, process_count: int) -> Iterator[HostBatch]:
    """This process's part of each evaluation batch."""

  def train_batches(self, sharding: jax.sharding.NamedSharding,
                    start_step: int = 0) -> Iterator[Batch]:
    return global_batches(
        self.local_train_batches(jax.process_index(), jax.process_count(), start_step),
        sharding, int(self._config.input.prefetch))

  def eval_batches(self, sharding: jax.sharding.NamedSharding) -> Iterator[Batch]:
    return global_batches(
        self.local_eval_batches(jax.process_index(), jax.process_count()), sharding,
        int(self._config.input.prefetch))


def hide_accelerators_from_tensorflow() -> None:
  """Keeps TensorFlow off every GPU and TPU: preprocessing runs on the host CPU and must never
  take accelerator memory from JAX. Call before TensorFlow runs anything (idempotent).

  Raises:
    RuntimeError: when TensorFlow already initialized an accelerator.
  """
  for device_type in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], device_type)
    except RuntimeError:
      # TensorFlow initialized its devices already; only an accelerator in use is a problem.
      if tf.config.get_visible_devices(device_type):
        raise RuntimeError(
            f'TensorFlow already uses a {device_type}: call '
            'secvit_jax.data.pipeline.hide_accelerators_from_tensorflow() before anything runs '
            'TensorFlow') from None


def local_batch_size(global_batch: int, process_count: int, field: str) -> int:
  """`global_batch` / `process_count`, or an error naming `config.{field}`."""
  if global_batch % process_count:
    raise ValueError(f'config.{field}={global_batch} must be divisible by the number of JAX '
                     f'processes, {process_count}')
  return global_batch // process_count


def _stream_seed(seed: int, process_index: int, stream: int) -> tf.Tensor:
  """(2,) int64 seed of one random stream (0: order, 1: augmentation) of one process."""
  state = np.random.SeedSequence([seed % 2**64, process_index, stream]).generate_state(2)
  return tf.constant(state.astype(np.int64))


def _fold_in(seed: tf.Tensor, *data) -> tf.Tensor:
  """A (2,) seed derived from `seed` and the integers `data`, one after the other."""
  for value in data:
    seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(value, tf.int64))
  return seed


def _steps_per_epoch(share: sources.Share, repeats: int, local_batch: int) -> int:
  steps = share.num_examples * repeats // local_batch
  if steps < 1:
    raise ValueError(f"this process's share of the training split holds {share.num_examples} "
                     f'examples; {repeats} cop{"y" if repeats == 1 else "ies"} of each fill less '
                     f'than one local batch of {local_batch}: lower config.batch_size')
  return steps


def local_train_batches(share: sources.Share,
                        preprocess: Callable[[sources.Features, tf.Tensor], sources.Features], *,
                        local_batch: int, seed: int, process_index: int, start_step: int = 0,
                        repeats: int = 1) -> Iterator[HostBatch]:
  """A process's local training batches from global step `start_step` on, forever.

  Args:
    share: the process's share of the training split.
    preprocess: (features, (2,) int64 seed) -> features of fixed shapes; a function of its inputs.
    local_batch: examples per local batch.
    seed: the run's seed.
    process_index: this process (seeds its streams).
    start_step: the global step of the first batch.
    repeats: copies of each drawn example, each preprocessed with its own seed, placed next to each
      other in the stream (repeated augmentation); 1 is off.

  Yields:
    Dicts of NumPy arrays with a leading axis of `local_batch`, as `preprocess` names them.
  """
  steps_per_epoch = _steps_per_epoch(share, repeats, local_batch)
  copies_per_epoch = steps_per_epoch * local_batch
  order_base = _stream_seed(seed, process_index, 0)
  augment_base = _stream_seed(seed, process_index, 1)
  first_epoch, first_step = divmod(start_step, steps_per_epoch)

  def epoch_copies(examples: tf.data.Dataset, epoch, first_copy) -> tf.data.Dataset:
    """(seed, features) of one epoch's copies from copy `first_copy` on; `examples` are the
    epoch's (position, features) from position first_copy // repeats."""
    def copies(position, features):
      seeds = tf.data.Dataset.range(repeats).map(
          lambda copy: _fold_in(augment_base, epoch, position, copy))
      return tf.data.Dataset.zip((seeds, tf.data.Dataset.from_tensors(features).repeat()))

    ds = examples.flat_map(copies).skip(first_copy % repeats)
    return ds.take(copies_per_epoch - first_copy)

  def batches(copies: tf.data.Dataset) -> Iterator[HostBatch]:
    ds = copies.map(lambda copy_seed, features: preprocess(features, copy_seed),
                    num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.as_numpy_iterator()

  if isinstance(share, sources.IndexedShare):
    # One pipeline over all epochs: nothing is rebuilt or retraced when an epoch ends.
    def indexed_epoch(epoch):
      first_copy = tf.where(epoch == first_epoch, tf.constant(first_step * local_batch, tf.int64),
                            tf.constant(0, tf.int64))
      examples = share.elements(_fold_in(order_base, epoch), first_copy // repeats)
      return epoch_copies(examples, epoch, first_copy)

    local = batches(tf.data.Dataset.range(first_epoch, 2**62).flat_map(indexed_epoch))
  else:
    # A sequentially read share (TFDS) is opened from Python, one epoch after the other.
    def sequential_epoch(epoch):
      first_copy = first_step * local_batch if epoch == first_epoch else 0
      examples = share.elements(_fold_in(order_base, epoch).numpy(), first_copy // repeats)
      return epoch_copies(examples, epoch, first_copy)

    local = itertools.chain.from_iterable(
        batches(sequential_epoch(epoch)) for epoch in itertools.count(first_epoch))

  def batch_files(number: int):
    epoch, step = divmod(start_step + number, steps_per_epoch)
    positions = np.arange(step * local_batch, (step + 1) * local_batch) // repeats
    return _fold_in(order_base, epoch), np.unique(positions)

  yield from _naming_bad_files(local, share, batch_files)


def eval_batch_count(num_examples: int, process_count: int, local_batch: int) -> int:
  """Local evaluation batches per process: enough for the largest share of a split of
  `num_examples` (shares differ by at most one example)."""
  largest = -(-num_examples // process_count)
  return -(-largest // local_batch)


def local_eval_batches(share: sources.Share,
                       preprocess: Callable[[sources.Features], sources.Features], *,
                       local_batch: int, num_batches: int) -> Iterator[HostBatch]:
  """One pass over a process's share of an evaluation split, in the split's order.

  Args:
    share: the share.
    preprocess: features -> features of fixed, fully defined shapes.
    local_batch: examples per batch.
    num_batches: batches to yield (see `eval_batch_count`); the examples missing from the last
      ones are zeros.

  Yields:
    The preprocessed features of `local_batch` examples, and 'mask': bool (local_batch,), False
    where an example is padding.
  """
  def evaluated(position, features):
    del position
    return {**preprocess(features), 'mask': tf.constant(True)}

  ds = share.elements(None, 0).map(evaluated, num_parallel_calls=tf.data.AUTOTUNE)
  padding = tf.data.Dataset.from_tensors(tf.nest.map_structure(
      lambda spec: tf.zeros(spec.shape, spec.dtype), ds.element_spec)).repeat()
  padding = padding.map(lambda example: {**example, 'mask': tf.constant(False)})
  ds = ds.concatenate(padding).take(num_batches * local_batch)
  ds = ds.batch(local_batch).prefetch(tf.data.AUTOTUNE)
  yield from _naming_bad_files(
      ds.as_numpy_iterator(), share,
      lambda number: (None, np.arange(number * local_batch, (number + 1) * local_batch)))


def _naming_bad_files(batches: Iterator[HostBatch], share: sources.Share,
                      files_of_batch: Callable[[int], tuple[tf.Tensor | None, np.ndarray]]
                      ) -> Iterator[HostBatch]:
  """Passes `batches` on; when one fails to decode, raises an error naming the bad file(s).

  Policy for corrupt or non-image files in a folder dataset: stop with an error naming the file,
  rather than skip it. Skipping would make an evaluation silently cover fewer images than the
  split holds, and would shift every later training batch, breaking the (seed, step) -> batch
  determinism that resumption relies on; and a corrupt file in a prepared image folder usually
  means a damaged copy that should be fixed before spending accelerator hours on it. The run then
  resumes from its last checkpoint; replacing the file by a good copy keeps every batch as it was
  (deleting it changes the file list, hence the order, from then on).

  Args:
    batches: the local batches, in order.
    share: the source of the batches.
    files_of_batch: batch number -> (order seed, positions of the share in that batch).
  """
  for number in itertools.count():
    try:
      batch = next(batches)
    except StopIteration:
      return
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as error:
      bad = _undecodable(share.files_at(*files_of_batch(number)))
      if not bad:
        raise
      raise ValueError('cannot decode image file(s) of the dataset:\n  ' + '\n  '.join(
          f'{path}: {reason}' for path, reason in bad) + '\nRemove or replace them, then restart '
          '(training resumes from its last checkpoint).') from error
    yield batch


def _undecodable(paths: list[str]) -> list[tuple[str, str]]:
  """The files among `paths` that the pipeline cannot decode, with TensorFlow's reason."""
  bad = []
  for path in paths:
    try:
      data = tf.io.read_file(path)
      ops.decode_image(data)
      ops.decode_and_random_resized_crop(data, tf.constant([0, 0], tf.int64), 8)
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as error:
      bad.append((path, error.message.strip().splitlines()[0]))
  return bad


def global_batches(local_batches: Iterator[HostBatch], sharding: jax.sharding.NamedSharding,
                   prefetch: int) -> Iterator[Batch]:
  """Assembles local batches into global arrays laid out by `sharding` along their first axis.

  Keeps `prefetch` global batches in flight (their host-to-device copies run asynchronously).
  """
  batch_sharding = jax.sharding.NamedSharding(
      sharding.mesh, jax.sharding.PartitionSpec(sharding.spec[0] if sharding.spec else None))
  queue = collections.deque()
  for local in local_batches:
    queue.append({
        key: jax.make_array_from_process_local_data(
            batch_sharding, value, (value.shape[0] * jax.process_count(),) + value.shape[1:])
        for key, value in local.items()})
    if len(queue) > prefetch:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
