"""Datasets as the input pipelines read them: splits, per-process shares, examples as feature dicts.

A `Source` is a dataset: its classes, its splits and their sizes, and `share(split, process_index,
process_count)`, the part of a split one JAX process reads (TFDS: the process's
`tfds.split_for_jax_process` range of records; folders and arrays: every process_count-th
example). A `Share` yields its examples as a `tf.data.Dataset` of (int64 position, features), the
features a dict of tensors named by what they hold ('image': the encoded file or decoded uint8
(H, W, 3); 'label': int32; a segmentation source adds its label map, a detection source its
boxes), so that whatever a task needs flows through the same batching (`pipeline.py`).

Sources here: the classification datasets ('digits', an image folder, any TFDS image classification
dataset). Nothing is ever downloaded: an unprepared TFDS dataset is an error that says how to
prepare it.
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import functools
import os
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from secvit_jax.data import ops

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.gif', '.bmp', '.webp')
Features = dict[str, tf.Tensor]


class UnknownDatasetError(ValueError):
  """No dataset of that name is known (to TFDS)."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a task needs to know of its data before reading any: sizes and classes."""
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  class_names: tuple[str, ...] = ()  # One per class, in label order; () when unknown.


# ------------------------------------------------------------------------------------------------
# Shares: one process's part of a split.
# ------------------------------------------------------------------------------------------------


class Share(abc.ABC):
  """One process's share of a split: `num_examples` examples, read as (position, features).

  `encoded`: whether the 'image' feature holds encoded file contents (a string scalar) rather than
  decoded uint8 (H, W, 3).
  """
  num_examples: int
  encoded: bool

  @abc.abstractmethod
  def elements(self, order_seed: Any, start: int) -> tf.data.Dataset:
    """(int64 position, features) from position `start` on, one pass; `order_seed` None reads
    the split's own order, else a seeded shuffle of it."""

  def files_at(self, order_seed: Any, positions: np.ndarray) -> list[str]:
    """The files read at `positions` of the order of `order_seed`, for error messages; [] when
    the share does not read files."""
    del order_seed, positions
    return []


class IndexedShare(Share):
  """A share with random access to its examples: shuffled exactly, skipped for free.

  `load(index)` maps an int64 index tensor to the example's features.
  """

  def __init__(self, num_examples: int, encoded: bool, load: Callable[[tf.Tensor], Features]):
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
    """Args: order_seed: (2,) int64 tensor, or None; start: int64 scalar (tensor or int)."""
    positions = tf.data.Dataset.range(start, self.num_examples)
    return positions.map(lambda position: (position, self._load(self.indices(order_seed,
                                                                              position))),
                         num_parallel_calls=tf.data.AUTOTUNE)


class FileShare(IndexedShare):
  """Examples made of files and per-example values.

  Args:
    files: feature name -> one path per example; the feature is the file's contents.
    values: feature name -> one value per example (an array, or a tf.RaggedTensor for lists).
  """

  def __init__(self, files: Mapping[str, Sequence[str]], values: Mapping[str, Any]):
    self._files = {name: list(paths) for name, paths in files.items()}
    files_t = {name: tf.constant(paths, tf.string) for name, paths in self._files.items()}
    values_t = {name: value if isinstance(value, tf.RaggedTensor) else tf.constant(value)
                for name, value in values.items()}

    def load(index):
      features = {name: tf.io.read_file(tf.gather(paths, index))
                  for name, paths in files_t.items()}
      features.update({name: tf.gather(value, index) for name, value in values_t.items()})
      return features

    super().__init__(len(next(iter(self._files.values()))), 'image' in files, load)

  def files_at(self, order_seed, positions):
    positions = np.asarray(positions, np.int64)
    positions = positions[(positions >= 0) & (positions < self.num_examples)]
    if not positions.size:
      return []
    indices = np.asarray(self.indices(order_seed, tf.constant(positions)))
    return [paths[i] for i in indices for paths in self._files.values()]


class TfdsShare(Share):
  """A range of a TFDS split, read sequentially: files shuffled by seed, then a shuffle buffer.

  Args:
    builder: the prepared dataset's builder.
    split: a split or split range (e.g. from `tfds.split_for_jax_process`).
    features: maps a TFDS example (images left encoded) to the share's features.
    shuffle_buffer: examples in the shuffle buffer of a shuffled read.
    skip_decoding: the TFDS features read as their encoded bytes (the images: the preprocessing
      decodes them, cropping JPEGs while decoding).
  """
  encoded = True

  def __init__(self, builder: tfds.core.DatasetBuilder, split: Any,
               features: Callable[[Features], Features], shuffle_buffer: int,
               skip_decoding: Sequence[str]):
    self.num_examples = builder.info.splits[split].num_examples
    self._builder = builder
    self._split = split
    self._features = features
    self._shuffle_buffer = shuffle_buffer
    self._decoders = {name: tfds.decode.SkipDecoding() for name in skip_decoding}

  def elements(self, order_seed: np.ndarray | None, start: int) -> tf.data.Dataset:
    """Args: order_seed: (2,) integers, seeds of the file shuffle and of the shuffle buffer, or
    None; start: the first position yielded. The records before it are read (not decoded) and
    dropped: that is the cost of resuming inside an epoch."""
    shuffle = order_seed is not None
    read_config = tfds.ReadConfig(
        shuffle_seed=int(order_seed[0]) if shuffle else None, try_autocache=False,
        enable_ordering_guard=False)
    ds = self._builder.as_dataset(split=self._split, shuffle_files=shuffle,
                                  read_config=read_config, decoders=self._decoders)
    ds = ds.map(self._features)
    if shuffle:
      ds = ds.shuffle(self._shuffle_buffer, seed=int(order_seed[1]),
                      reshuffle_each_iteration=False)
    ds = ds.skip(start)
    return tf.data.Dataset.zip((tf.data.Dataset.range(start, self.num_examples), ds))


# ------------------------------------------------------------------------------------------------
# Sources.
# ------------------------------------------------------------------------------------------------


class Source(abc.ABC):
  """A dataset with named splits; `default_splits` is (training split, evaluation split)."""
  default_splits: tuple[str, str]

  @property
  @abc.abstractmethod
  def class_names(self) -> tuple[str, ...]:
    """The name of each class, in label order."""

  @abc.abstractmethod
  def share(self, split: str, process_index: int, process_count: int) -> Share:
    """Process `process_index`'s share (of `process_count`) of `split`."""

  def num_examples(self, split: str) -> int:
    return self.share(split, 0, 1).num_examples


class DigitsSource(Source):
  """scikit-learn's handwritten digits (1797 8×8 grayscale images, 10 classes), installed with the
  requirements: nothing to download, the offline dataset of the demo and the tests.

  A fixed stratified 20% is held out ('test', 360 images; 'train' keeps 1437), independent of the
  run's seed so that every run is evaluated on the same images. Images are upscaled (bicubic) to
  `image_size` with 3 equal channels and served decoded.
  """
  default_splits = ('train', 'test')
  EVAL_FRACTION = 0.2
  SPLIT_SEED = 0

  def __init__(self, image_size: int):
    self._image_size = image_size

  @property
  def class_names(self) -> tuple[str, ...]:
    return tuple(str(digit) for digit in range(10))

  def share(self, split, process_index, process_count):
    arrays = digits_arrays(self._image_size)
    if split not in arrays:
      raise ValueError(f"the digits dataset has splits 'train' and 'test', got {split!r}")
    images, labels = (x[process_index::process_count] for x in arrays[split])
    images_t, labels_t = tf.constant(images), tf.constant(labels)
    return IndexedShare(len(labels), False, lambda i: {'image': tf.gather(images_t, i),
                                                       'label': tf.gather(labels_t, i)})


@functools.lru_cache(maxsize=1)
def digits_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{'train', 'test'}: (uint8 (N, 8, 8) images, white on black in 0..255, int32 (N,) labels) of
  the digits, split as `DigitsSource` splits them."""
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  digits = sk_datasets.load_digits()
  # Values 0..16 (white on black) -> 0..255.
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  train_x, test_x, train_y, test_y = model_selection.train_test_split(
      images, digits.target, test_size=DigitsSource.EVAL_FRACTION,
      random_state=DigitsSource.SPLIT_SEED, stratify=digits.target)
  return {'train': (train_x, train_y.astype(np.int32)), 'test': (test_x, test_y.astype(np.int32))}


@functools.lru_cache(maxsize=4)
def digits_arrays(image_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{'train', 'test'}: (uint8 (N, S, S, 3) images, int32 (N,) labels) of the digits."""
  def upscale(x):
    x = tf.image.grayscale_to_rgb(tf.constant(x[..., None]))
    return ops.resize_bicubic(x, image_size, image_size).numpy()

  return {split: (upscale(images), labels) for split, (images, labels) in digits_splits().items()}


class ImageFolderSource(Source):
  """An image folder as the release trains from: ROOT/train/<class>/*.JPEG and
  ROOT/val/<class>/*.JPEG (JPEG, PNG, GIF, BMP or WebP content, any of the extensions of
  `IMAGE_EXTENSIONS` in any case; other files are ignored). Classes are the sorted directory names
  of the training split."""
  default_splits = ('train', 'val')

  def __init__(self, root: str | None):
    if not root:
      raise ValueError("config.dataset='folder' needs config.data_dir, the folder's ROOT")
    self._root = root

  @property
  def class_names(self) -> tuple[str, ...]:
    return list_image_folder(self._root, 'train')[2]

  def share(self, split, process_index, process_count):
    paths, labels, _ = list_image_folder(self._root, split)
    return FileShare({'image': paths[process_index::process_count]},
                     {'label': np.asarray(labels[process_index::process_count], np.int32)})


@functools.lru_cache(maxsize=8)
def list_image_folder(root: str, split: str) -> tuple[tuple[str, ...], tuple[int, ...],
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


class TfdsClassificationSource(Source):
  """A prepared TFDS image classification dataset (an image and a ClassLabel feature: its
  supervised keys, else 'image' and 'label'), e.g. 'imagenet2012'.

  Args:
    name: the TFDS name.
    data_dir: where it is prepared (None: $TFDS_DATA_DIR, else ~/tensorflow_datasets; gs:// paths
      work).
    shuffle_buffer: examples in the shuffle buffer of a training stream.
  """

  def __init__(self, name: str, data_dir: str | None, shuffle_buffer: int):
    self._builder = prepared_tfds_builder(name, data_dir)
    self._shuffle_buffer = shuffle_buffer
    keys = self._builder.info.supervised_keys or ('image', 'label')
    features = self._builder.info.features
    if len(keys) != 2 or keys[0] not in features or keys[1] not in features or not isinstance(
        features[keys[1]], tfds.features.ClassLabel):
      raise ValueError(f'TFDS dataset {name!r} is not an image classification dataset: expected '
                       f'an image and a ClassLabel feature, got {features}')
    self._image_key, self._label_key = keys
    splits = self._builder.info.splits
    self.default_splits = ('train', 'validation' if 'validation' in splits else 'test')

  @property
  def class_names(self) -> tuple[str, ...]:
    return tuple(self._builder.info.features[self._label_key].names)

  def share(self, split, process_index, process_count):
    if split not in self._builder.info.splits:
      raise ValueError(f'TFDS dataset {self._builder.name!r} has no split {split!r}; it has '
                       f'{sorted(self._builder.info.splits)}')
    image_key, label_key = self._image_key, self._label_key
    return TfdsShare(
        self._builder,
        tfds.split_for_jax_process(split, process_index=process_index,
                                   process_count=process_count),
        lambda ex: {'image': ex[image_key], 'label': tf.cast(ex[label_key], tf.int32)},
        self._shuffle_buffer, skip_decoding=(image_key,))


def prepared_tfds_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The builder of a prepared TFDS dataset; never downloads or prepares anything.

  Raises:
    UnknownDatasetError: TFDS knows no dataset `name`.
    ValueError: naming what is missing and how to prepare it.
  """
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise UnknownDatasetError(str(e).splitlines()[0]) from None
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
