"""Datasets and input pipelines: host-side tf.data preprocessing feeding global jax.Arrays.

Datasets (`config.dataset`):
  'digits'  scikit-learn's handwritten digits (1797 8×8 grayscale images, 10 classes), installed
            with the requirements, so it needs no download: the offline default for the demo and
            the tests. A fixed stratified 20% is held out ('test', 360 images; 'train' keeps
            1437); images are upscaled (bicubic) to `config.image_size` with 3 equal channels.
  'folder'  an image folder as the release trains from: `config.data_dir`/train/<class>/*.JPEG and
            `config.data_dir`/val/<class>/*.JPEG (JPEG, PNG, GIF, BMP or WebP content, any of the
            extensions .jpg .jpeg .png .gif .bmp .webp in any case; other files are ignored).
            Classes are the sorted directory names of the training split.
  any other a TFDS image classification dataset prepared in `config.data_dir` (None: the
            TFDS_DATA_DIR environment variable, else ~/tensorflow_datasets; gs:// paths work),
            e.g. 'imagenet2012'. Nothing is ever downloaded: an unprepared dataset is an error
            that says how to prepare it.

Per-process sharding: each JAX process reads a disjoint share of a split (TFDS: the process's
`tfds.split_for_jax_process` range of records; folders and digits: every process_count-th
example), preprocesses it into local batches of batch_size / process_count and contributes them
to one global array (`jax.make_array_from_process_local_data`), a few of which are kept in flight
to the devices.

Determinism and resumption: training batch k is a function of (config.seed, k, process_count).
Each process's stream is divided into epochs of `steps_per_epoch` whole local batches (the
examples of the share in a per-epoch seeded order, each repeated `repeated_augmentations` times,
the last incomplete batch dropped). Every copy is augmented with stateless random ops seeded by
(seed, process, epoch, position in the epoch, copy), so resuming at step k only has to find epoch
k // steps_per_epoch and skip to its start: free for 'digits' and 'folder' (the epoch order is
`tf.random.experimental.index_shuffle`, computed per position), and a read of the records that
precede it within that epoch (no decoding) for TFDS, whose epoch order is a seeded file shuffle
and shuffle buffer.

TensorFlow runs on the host CPU only: importing this module hides all GPUs and TPUs from it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import os
from typing import Any, Callable, Iterator

from absl import logging
import jax
import ml_collections
import numpy as np

# Imported before TensorFlow is used anywhere: it hides the accelerators from TensorFlow.
from secvit_jax import preprocess_ops as ops

import tensorflow as tf  # pylint: disable=g-bad-import-order
import tensorflow_datasets as tfds  # pylint: disable=g-bad-import-order

DIGITS = 'digits'
FOLDER = 'folder'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.gif', '.bmp', '.webp')
# The digits' held-out split: a fixed seed, independent of config.seed, so that every run is
# evaluated on the same images.
DIGITS_EVAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  class_names: tuple[str, ...] | None = None  # One per class, in label order.


def default_input_config() -> ml_collections.ConfigDict:
  """The release's training preprocessing (SPEC §5): the value of `config.input`.

  Fields:
    random_resized_crop: crop a random window (area fraction in `crop_scale`, aspect ratio in
      `crop_ratio`) and resize it to the training size (bicubic); off: resize the shorter side to
      the training size and take the central square.
    crop_scale, crop_ratio: (min, max) of the random resized crop.
    hflip: mirror left-right with probability 0.5.
    randaugment: a timm RandAugment spec such as 'rand-m9-mstd0.5-inc1'; '' is off.
    random_erasing: probability of erasing one random rectangle with per-pixel noise; 0 is off.
    repeated_augmentations: copies of each drawn image, each augmented independently, placed
      next to each other in the stream; 1 is off.
    mixup_alpha, cutmix_alpha, mixup_switch_prob, label_smoothing: on-device mixing, see
      `secvit_jax.mixup.mix_batch` (the input pipeline only carries them).
    shuffle_buffer: examples in the shuffle buffer of a TFDS training stream (the other datasets
      are shuffled exactly).
    prefetch: global batches kept in flight to the devices.
  """
  return ml_collections.ConfigDict({
      'random_resized_crop': True,
      'crop_scale': (0.08, 1.0),
      'crop_ratio': (3 / 4, 4 / 3),
      'hflip': True,
      'randaugment': 'rand-m9-mstd0.5-inc1',
      'random_erasing': 0.25,
      'repeated_augmentations': 3,
      'mixup_alpha': 0.8,
      'cutmix_alpha': 1.0,
      'mixup_switch_prob': 0.5,
      'label_smoothing': 0.1,
      'shuffle_buffer': 10_000,
      'prefetch': 2,
  })


# ------------------------------------------------------------------------------------------------
# Evaluation preprocessing.
# ------------------------------------------------------------------------------------------------


def preprocess_for_eval(image_bytes: tf.Tensor, image_size: int = 224) -> tf.Tensor:
  """The release's evaluation transform on an encoded image: float32 (S, S, 3) normalized HWC.

  Decodes (JPEGs with the accurate DCT, as PIL) and applies `eval_crop` and ImageNet's
  normalization. Agrees with the release's PIL/torchvision transform to well under 0.005 per value
  on real photographs.

  Args:
    image_bytes: scalar string tensor (JPEG, PNG, GIF, BMP or WebP file contents).
    image_size: S.
  """
  return ops.normalize(eval_crop(ops.decode_image(image_bytes, accurate=True), image_size))


def eval_crop(image: tf.Tensor, image_size: int = 224) -> tf.Tensor:
  """The evaluation transform's geometry: uint8 (H, W, 3) -> uint8 (S, S, 3).

  Resizes the shorter side to int(image_size * 256 / 224) with antialiased bicubic interpolation
  (as PIL) and takes the central image_size × image_size square.
  """
  image = ops.resize_shorter_side(image, int(image_size * 256 / 224), pil_rounding=True)
  image = ops.center_crop(image, image_size)
  image.set_shape([image_size, image_size, 3])
  return image


def _check_input_config(icfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first invalid field of `config.input`."""
  low, high = icfg.crop_scale
  if not 0 < low <= high <= 1:
    raise ValueError(f'config.input.crop_scale must satisfy 0 < min <= max <= 1, got '
                     f'{tuple(icfg.crop_scale)}')
  low, high = icfg.crop_ratio
  if not 0 < low <= high:
    raise ValueError(f'config.input.crop_ratio must satisfy 0 < min <= max, got '
                     f'{tuple(icfg.crop_ratio)}')
  if not 0 <= icfg.random_erasing <= 1:
    raise ValueError(f'config.input.random_erasing is a probability, got {icfg.random_erasing}')
  if int(icfg.repeated_augmentations) != icfg.repeated_augmentations or (
      icfg.repeated_augmentations < 1):
    raise ValueError('config.input.repeated_augmentations must be an integer >= 1, got '
                     f'{icfg.repeated_augmentations}')
  if icfg.randaugment:
    ops.parse_randaugment(icfg.randaugment)


def _train_preprocess_fn(icfg: ml_collections.ConfigDict, image_size: int,
                         encoded: bool) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
  """The training transform (image, (2,) seed) -> float32 (S, S, 3), as timm's for the release.

  Order: (decode and) random resized crop, horizontal flip, RandAugment, normalization, random
  erasing; each switchable in `icfg`. `encoded`: images are file contents (string scalars), else
  decoded uint8 (H, W, 3).
  """
  randaugment = ops.parse_randaugment(icfg.randaugment) if icfg.randaugment else None
  scale, ratio = tuple(icfg.crop_scale), tuple(icfg.crop_ratio)

  def preprocess(image, seed):
    seeds = tf.random.experimental.stateless_split(seed, 4)
    if icfg.random_resized_crop:
      if encoded:
        image = ops.decode_and_random_resized_crop(image, seeds[0], image_size, scale, ratio)
      else:
        image = ops.random_resized_crop(image, seeds[0], image_size, scale, ratio)
    else:
      if encoded:
        image = ops.decode_image(image)
      image = ops.center_crop(ops.resize_shorter_side(image, image_size), image_size)
    image.set_shape([image_size, image_size, 3])
    if icfg.hflip:
      image = ops.random_flip_left_right(image, seeds[1])
    if randaugment:
      image = ops.rand_augment(image, seeds[2], randaugment)
      image.set_shape([image_size, image_size, 3])
    image = ops.normalize(image)
    if icfg.random_erasing > 0:
      image = ops.random_erasing(image, seeds[3], icfg.random_erasing)
    return image

  return preprocess


# ------------------------------------------------------------------------------------------------
# Sources: one process's share of a split.
# ------------------------------------------------------------------------------------------------


class _Share:
  """One process's share of a split: `num_examples` (image, label) pairs.

  Images are encoded files (`encoded`, string scalars) or decoded uint8 (S, S, 3); labels int32.
  `elements(order_seed, start)` reads it as a tf.data.Dataset of (int64 position, image, label).
  """
  num_examples: int
  encoded: bool

  def files_at(self, order_seed: tf.Tensor | None, positions: np.ndarray) -> list[str]:
    """The files at `positions` of the share in the order of `order_seed`, if it has files."""
    del order_seed, positions
    return []


class _IndexedShare(_Share):
  """A share with random access to its examples: shuffled exactly, skipped for free."""

  def __init__(self, num_examples: int, encoded: bool,
               load: Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]):
    self.num_examples = num_examples
    self.encoded = encoded
    self._load = load

  def indices(self, order_seed: tf.Tensor | None, positions: tf.Tensor) -> tf.Tensor:
    """Index in the share of the example at each position (int64) of the order_seed's order."""
    if order_seed is None:
      return positions
    return tf.random.experimental.index_shuffle(
        positions, order_seed, tf.constant(self.num_examples - 1, tf.int64))

  def elements(self, order_seed: tf.Tensor | None, start) -> tf.data.Dataset:
    """(position, image, label) from position `start` on, one pass.

    Args:
      order_seed: (2,) int64 tensor: a shuffle of the share; None: the split's own order.
      start: int64 scalar (tensor or int), the first position yielded.
    """
    def load(position):
      return (position, *self._load(self.indices(order_seed, position)))

    positions = tf.data.Dataset.range(start, self.num_examples)
    return positions.map(load, num_parallel_calls=tf.data.AUTOTUNE)


class _FileShare(_IndexedShare):
  """Files of an image folder, with their labels."""

  def __init__(self, paths: list[str], labels: np.ndarray):
    self._paths = paths
    paths_t = tf.constant(paths)
    labels_t = tf.constant(labels, tf.int32)
    super().__init__(len(paths), True,
                     lambda i: (tf.io.read_file(tf.gather(paths_t, i)), tf.gather(labels_t, i)))

  def files_at(self, order_seed, positions):
    positions = np.asarray(positions, np.int64)
    positions = positions[(positions >= 0) & (positions < self.num_examples)]
    if not positions.size:
      return []
    return [self._paths[i] for i in np.asarray(self.indices(order_seed, tf.constant(positions)))]


class _TfdsShare(_Share):
  """A TFDS split range, read sequentially: files shuffled by seed, then a shuffle buffer."""

  def __init__(self, builder: tfds.core.DatasetBuilder, split: Any, image_key: str,
               label_key: str):
    self.num_examples = builder.info.splits[split].num_examples
    self.encoded = True
    self._builder = builder
    self._split = split
    self._image_key = image_key
    self._label_key = label_key

  def elements(self, order_seed: np.ndarray | None, start: int,
               shuffle_buffer: int = 0) -> tf.data.Dataset:
    """(position, image, label) from position `start` on, one pass.

    Args:
      order_seed: (2,) integers: seeds of the file shuffle and of the shuffle buffer; None: the
        split's own order.
      start: the first position yielded. The records before it are read (not decoded) and
        dropped: that is the cost of resuming inside an epoch.
      shuffle_buffer: examples in the shuffle buffer.
    """
    shuffle = order_seed is not None
    read_config = tfds.ReadConfig(
        shuffle_seed=int(order_seed[0]) if shuffle else None, try_autocache=False,
        enable_ordering_guard=False)
    ds = self._builder.as_dataset(
        split=self._split, shuffle_files=shuffle, read_config=read_config,
        decoders={self._image_key: tfds.decode.SkipDecoding()})
    ds = ds.map(lambda ex: (ex[self._image_key], tf.cast(ex[self._label_key], tf.int32)))
    if shuffle:
      ds = ds.shuffle(shuffle_buffer, seed=int(order_seed[1]), reshuffle_each_iteration=False)
    ds = ds.skip(start)
    positions = tf.data.Dataset.range(start, self.num_examples)
    return tf.data.Dataset.zip((positions, ds)).map(lambda p, ex: (p, *ex))


@functools.lru_cache(maxsize=4)
def _digits_arrays(image_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{'train', 'test'}: (uint8 (N, S, S, 3) images, int32 (N,) labels) of the digits."""
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  digits = sk_datasets.load_digits()
  # Values 0..16 (white on black) -> 0..255.
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  train_x, test_x, train_y, test_y = model_selection.train_test_split(
      images, digits.target, test_size=DIGITS_EVAL_FRACTION, random_state=DIGITS_SPLIT_SEED,
      stratify=digits.target)

  def upscale(x):
    x = ops.resize_bicubic(tf.image.grayscale_to_rgb(tf.constant(x)), image_size, image_size)
    return x.numpy()

  return {'train': (upscale(train_x), train_y.astype(np.int32)),
          'test': (upscale(test_x), test_y.astype(np.int32))}


@functools.lru_cache(maxsize=8)
def _list_folder(root: str, split: str) -> tuple[tuple[str, ...], tuple[int, ...],
                                                 tuple[str, ...]]:
  """(paths, labels, class names) of ROOT/split/<class>/<image>, sorted by class then name.

  The classes are the sorted directories of ROOT/train (the release's ImageFolder), whichever
  split is listed. Files without an image extension are ignored (and counted in the log).

  Raises:
    FileNotFoundError: naming the missing directory and the expected layout.
    ValueError: naming a class directory of `split` that ROOT/train lacks, or an empty split.
  """
  def subdirs(path):
    if not tf.io.gfile.isdir(path):
      raise FileNotFoundError(
          f'{path} is not a directory; a folder dataset is ROOT/train/<class>/<image> and '
          'ROOT/val/<class>/<image> with ROOT = config.data_dir')
    return sorted(name.rstrip('/') for name in tf.io.gfile.listdir(path)
                  if tf.io.gfile.isdir(os.path.join(path, name)))

  classes = subdirs(os.path.join(root, 'train'))
  split_classes = subdirs(os.path.join(root, split))
  unknown = sorted(set(split_classes) - set(classes))
  if unknown:
    raise ValueError(f'{os.path.join(root, split)} has class directories that '
                     f'{os.path.join(root, "train")} lacks: {unknown[:10]}')
  class_index = {name: i for i, name in enumerate(classes)}

  def list_class(name):
    directory = os.path.join(root, split, name)
    return directory, sorted(tf.io.gfile.listdir(directory))

  paths, labels, ignored = [], [], 0
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    for (directory, files), name in zip(pool.map(list_class, split_classes), split_classes):
      for file in files:
        if file.lower().endswith(IMAGE_EXTENSIONS):
          paths.append(os.path.join(directory, file))
          labels.append(class_index[name])
        else:
          ignored += 1
  if not paths:
    raise ValueError(f'{os.path.join(root, split)} holds no images (extensions '
                     f'{", ".join(IMAGE_EXTENSIONS)})')
  if ignored:
    logging.info('%s: ignored %d files without an image extension', os.path.join(root, split),
                 ignored)
  return tuple(paths), tuple(labels), tuple(classes)


def _tfds_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The builder of a prepared TFDS dataset; never downloads or prepares anything.

  Raises:
    ValueError: for an unknown dataset name, or naming what is missing and how to prepare it.
  """
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"config.dataset={name!r} is neither '{DIGITS}', '{FOLDER}' nor a TFDS "
                     f'dataset: {str(e).splitlines()[0]}') from None
  if not builder.is_prepared():
    root = str(builder.data_dir_root)
    steps = []
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
      lines = builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip().splitlines()
      instructions = '\n'.join('       ' + line.strip() for line in lines)
      steps.append(f'put its source files in {os.path.join(root, "downloads", "manual")}:\n'
                   f'{instructions}')
    steps.append(f'python -c "import tensorflow_datasets as tfds; tfds.builder({name!r}, '
                 f"data_dir='{root}').download_and_prepare()\"")
    raise ValueError(
        f'TFDS dataset {name!r} is not prepared in {root} (no {builder.data_dir}).\n'
        'Point config.data_dir (or the TFDS_DATA_DIR environment variable) at the directory that '
        'holds it prepared (gs:// paths work), or prepare it there once:\n' + '\n'.join(
            f'  {number}. {step}' for number, step in enumerate(steps, 1)) +
        '\nTraining never downloads data.')
  return builder


def _tfds_keys(builder: tfds.core.DatasetBuilder) -> tuple[str, str]:
  """(image, label) feature names: the supervised keys, else 'image' and 'label'."""
  keys = builder.info.supervised_keys or ('image', 'label')
  features = builder.info.features
  if len(keys) != 2 or keys[0] not in features or keys[1] not in features or not isinstance(
      features[keys[1]], tfds.features.ClassLabel):
    raise ValueError(f'TFDS dataset {builder.name!r} is not an image classification dataset: '
                     f'expected an image and a ClassLabel feature, got {features}')
  return keys


def _dataset_name(config: ml_collections.ConfigDict) -> str:
  return config.get('dataset', DIGITS)


def _split_names(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(train split, eval split) from the config, defaulting per dataset."""
  name = _dataset_name(config)
  if name == DIGITS:
    defaults = ('train', 'test')
  elif name == FOLDER:
    defaults = ('train', 'val')
  else:
    splits = _tfds_builder(name, config.get('data_dir')).info.splits
    defaults = ('train', 'validation' if 'validation' in splits else 'test')
  return (config.get('train_split') or defaults[0], config.get('eval_split') or defaults[1])


def _share(config: ml_collections.ConfigDict, split: str, process_index: int,
           process_count: int) -> _Share:
  """Process `process_index`'s share (of `process_count`) of the dataset's `split`."""
  name = _dataset_name(config)
  if name == DIGITS:
    arrays = _digits_arrays(config.image_size)
    if split not in arrays:
      raise ValueError(f"the digits dataset has splits 'train' and 'test', got {split!r}")
    images, labels = (x[process_index::process_count] for x in arrays[split])
    images_t, labels_t = tf.constant(images), tf.constant(labels)
    return _IndexedShare(len(labels), False,
                         lambda i: (tf.gather(images_t, i), tf.gather(labels_t, i)))
  if name == FOLDER:
    if not config.get('data_dir'):
      raise ValueError("config.dataset='folder' needs config.data_dir, the folder's ROOT")
    paths, labels, _ = _list_folder(config.data_dir, split)
    return _FileShare(list(paths[process_index::process_count]),
                      np.asarray(labels[process_index::process_count], np.int32))
  builder = _tfds_builder(name, config.get('data_dir'))
  if split not in builder.info.splits:
    raise ValueError(f'TFDS dataset {name!r} has no split {split!r}; it has '
                     f'{sorted(builder.info.splits)}')
  image_key, label_key = _tfds_keys(builder)
  return _TfdsShare(builder, tfds.split_for_jax_process(
      split, process_index=process_index, process_count=process_count), image_key, label_key)


def get_dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
  """Classes (their number and names) and training and evaluation examples of `config`'s data."""
  name = _dataset_name(config)
  train_split, eval_split = _split_names(config)
  train, evaluation = (_share(config, split, 0, 1) for split in (train_split, eval_split))
  if name == DIGITS:
    class_names = tuple(str(digit) for digit in range(10))
  elif name == FOLDER:
    class_names = _list_folder(config.data_dir, train_split)[2]
  else:
    builder = _tfds_builder(name, config.get('data_dir'))
    class_names = tuple(builder.info.features[_tfds_keys(builder)[1]].names)
  return DatasetInfo(len(class_names), train.num_examples, evaluation.num_examples, class_names)


# ------------------------------------------------------------------------------------------------
# Local (per-process) batches.
# ------------------------------------------------------------------------------------------------


def _local_batch_size(global_batch: int, process_count: int, field: str) -> int:
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


def _naming_bad_files(batches: Iterator[Batch], share: _Share,
                      files_of_batch: Callable[[int], tuple[tf.Tensor | None, np.ndarray]]
                      ) -> Iterator[Batch]:
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


def _steps_per_epoch(share: _Share, repeats: int, local_batch: int) -> int:
  steps = share.num_examples * repeats // local_batch
  if steps < 1:
    raise ValueError(f"this process's share of the training split holds {share.num_examples} "
                     f'examples; {repeats} cop{"y" if repeats == 1 else "ies"} of each fill less '
                     f'than one local batch of {local_batch}: lower config.batch_size')
  return steps


def _local_train_batches(config: ml_collections.ConfigDict, process_index: int,
                         process_count: int, start_step: int = 0) -> Iterator[Batch]:
  """Process `process_index`'s local training batches from global step `start_step` on.

  Yields {'image': float32 (b, S, S, 3), 'label': int32 (b,)} forever, b = batch_size /
  process_count; a function of (config.seed, process_index, process_count, step) alone.
  """
  icfg = config.get('input') or default_input_config()
  _check_input_config(icfg)
  local_batch = _local_batch_size(config.batch_size, process_count, 'batch_size')
  share = _share(config, _split_names(config)[0], process_index, process_count)
  repeats = int(icfg.repeated_augmentations)
  steps_per_epoch = _steps_per_epoch(share, repeats, local_batch)
  copies_per_epoch = steps_per_epoch * local_batch
  order_base = _stream_seed(config.seed, process_index, 0)
  augment_base = _stream_seed(config.seed, process_index, 1)
  preprocess = _train_preprocess_fn(icfg, config.image_size, share.encoded)
  first_epoch, first_step = divmod(start_step, steps_per_epoch)

  def epoch_copies(examples: tf.data.Dataset, epoch, first_copy) -> tf.data.Dataset:
    """(seed, image, label) of one epoch's copies from copy `first_copy` on.

    `examples` are the epoch's (position, image, label) from position first_copy // repeats.
    """
    def copies(position, image, label):
      seeds = tf.data.Dataset.range(repeats).map(
          lambda copy: _fold_in(augment_base, epoch, position, copy))
      return tf.data.Dataset.zip((seeds, tf.data.Dataset.from_tensors((image, label)).repeat()))

    ds = examples.flat_map(copies).skip(first_copy % repeats)
    return ds.take(copies_per_epoch - first_copy).map(lambda seed, ex: (seed, *ex))

  def augment(seed, image, label):
    return {'image': preprocess(image, seed), 'label': label}

  def batches(copies: tf.data.Dataset) -> Iterator[Batch]:
    ds = copies.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.as_numpy_iterator()

  if isinstance(share, _IndexedShare):
    # One pipeline over all epochs: nothing is rebuilt or retraced when an epoch ends.
    def indexed_epoch(epoch):
      first_copy = tf.where(epoch == first_epoch, tf.constant(first_step * local_batch, tf.int64),
                            tf.constant(0, tf.int64))
      examples = share.elements(_fold_in(order_base, epoch), first_copy // repeats)
      return epoch_copies(examples, epoch, first_copy)

    local = batches(tf.data.Dataset.range(first_epoch, 2**62).flat_map(indexed_epoch))
  else:
    # A TFDS dataset is opened from Python, one epoch after the other.
    def tfds_epoch(epoch):
      first_copy = first_step * local_batch if epoch == first_epoch else 0
      examples = share.elements(_fold_in(order_base, epoch).numpy(), first_copy // repeats,
                                int(icfg.shuffle_buffer))
      return epoch_copies(examples, epoch, first_copy)

    local = itertools.chain.from_iterable(
        batches(tfds_epoch(epoch)) for epoch in itertools.count(first_epoch))

  def batch_files(number: int):
    epoch, step = divmod(start_step + number, steps_per_epoch)
    positions = np.arange(step * local_batch, (step + 1) * local_batch) // repeats
    return _fold_in(order_base, epoch), np.unique(positions)

  yield from _naming_bad_files(local, share, batch_files)


def _local_eval_batches(config: ml_collections.ConfigDict, process_index: int,
                        process_count: int) -> Iterator[Batch]:
  """Process `process_index`'s local evaluation batches: one pass over its share.

  Yields {'image': float32 (b, S, S, 3), 'label': int32 (b,), 'mask': bool (b,)}, b =
  eval_batch_size / process_count. Every process yields ceil(ceil(N / process_count) / b)
  batches, N the split's size; the examples missing from a process's last batches are zeros with
  mask False.
  """
  size = config.image_size
  eval_batch = config.get('eval_batch_size') or config.batch_size
  local_batch = _local_batch_size(eval_batch, process_count, 'eval_batch_size')
  split = _split_names(config)[1]
  share = _share(config, split, process_index, process_count)
  # The largest share (shares differ by at most one example) sets every process's batch count.
  largest = -(-_share(config, split, 0, 1).num_examples // process_count)
  num_batches = -(-largest // local_batch)

  def preprocess(position, image, label):
    del position
    image = preprocess_for_eval(image, size) if share.encoded else ops.normalize(image)
    return {'image': image, 'label': label, 'mask': tf.constant(True)}

  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros([size, size, 3], tf.float32), 'label': tf.constant(0, tf.int32),
      'mask': tf.constant(False)}).repeat()
  ds = share.elements(None, 0).map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.concatenate(padding).take(num_batches * local_batch)
  ds = ds.batch(local_batch).prefetch(tf.data.AUTOTUNE)
  yield from _naming_bad_files(
      ds.as_numpy_iterator(), share,
      lambda number: (None, np.arange(number * local_batch, (number + 1) * local_batch)))


# ------------------------------------------------------------------------------------------------
# Global batches.
# ------------------------------------------------------------------------------------------------


def _global_batches(local_batches: Iterator[Batch], sharding: jax.sharding.NamedSharding,
                    prefetch: int) -> Iterator[dict[str, jax.Array]]:
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


def create_train_iterator(config: ml_collections.ConfigDict,
                          sharding: jax.sharding.NamedSharding,
                          start_step: int = 0) -> Iterator[dict[str, jax.Array]]:
  """Endless training batches from step `start_step` on.

  Args:
    config: the run's config (dataset, data_dir, splits, image_size, batch_size, seed, input).
    sharding: layout of the global batch; its first axis is the batch.
    start_step: the global step of the first batch.

  Yields:
    {'image': float32 (B, S, S, 3) normalized NHWC, 'label': int32 (B,)}, global jax.Arrays,
    B = config.batch_size. Batch k is a function of (config.seed, k) (for a given number of
    processes): starting at start_step=k yields what an uninterrupted iterator yields from step k.
  """
  icfg = config.get('input') or default_input_config()
  return _global_batches(
      _local_train_batches(config, jax.process_index(), jax.process_count(), start_step),
      sharding, int(icfg.prefetch))


def create_eval_iterator(config: ml_collections.ConfigDict,
                         sharding: jax.sharding.NamedSharding) -> Iterator[dict[str, jax.Array]]:
  """One pass over the evaluation split, every example exactly once.

  Yields:
    {'image': float32 (B, S, S, 3), 'label': int32 (B,), 'mask': bool (B,)}, global jax.Arrays,
    B = config.eval_batch_size; the last batches are padded with zeros whose mask is False.
  """
  icfg = config.get('input') or default_input_config()
  return _global_batches(
      _local_eval_batches(config, jax.process_index(), jax.process_count()), sharding,
      int(icfg.prefetch))
