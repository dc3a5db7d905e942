"""Image classification data: the datasets, the release's training and evaluation transforms.

Datasets (`config.dataset`):
  'digits'  scikit-learn's handwritten digits, installed with the requirements (`DigitsSource`).
  'folder'  an image folder as the release trains from, ROOT = `config.data_dir`
            (`ImageFolderSource`).
  any other a prepared TFDS image classification dataset, e.g. 'imagenet2012', read from
            `config.data_dir` (None: $TFDS_DATA_DIR, else ~/tensorflow_datasets; gs:// works).

Training preprocessing (`config.input`, as timm's for the release): random resized crop (or resize
and central crop), horizontal flip, RandAugment, normalization, random erasing, each switchable;
repeated augmentation. Evaluation: the release's PIL/torchvision transform (`preprocess_for_eval`).
Mixup/CutMix and label smoothing happen on the device, in the task (`tasks/classification.py`).
"""

from __future__ import annotations

from typing import Callable, Iterator

import ml_collections
import tensorflow as tf

from secvit_jax.data import ops
from secvit_jax.data import pipeline
from secvit_jax.data import randaugment
from secvit_jax.data import sources

DIGITS = 'digits'
FOLDER = 'folder'


def open_source(config: ml_collections.ConfigDict) -> sources.Source:
  """The source `config.dataset` names (see the module docstring)."""
  name = config.dataset
  if name == DIGITS:
    return sources.DigitsSource(config.image_size)
  if name == FOLDER:
    return sources.ImageFolderSource(config.get('data_dir'))
  try:
    return sources.TfdsClassificationSource(name, config.get('data_dir'),
                                            int(config.input.shuffle_buffer))
  except sources.UnknownDatasetError as error:
    raise ValueError(f"config.dataset={name!r} is neither '{DIGITS}', '{FOLDER}' nor a TFDS "
                     f'dataset: {error}') from None


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


def check_input_config(icfg: ml_collections.ConfigDict) -> None:
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
    randaugment.parse_randaugment(icfg.randaugment)


def train_preprocess_fn(icfg: ml_collections.ConfigDict, image_size: int, encoded: bool
                        ) -> Callable[[sources.Features, tf.Tensor], sources.Features]:
  """The training transform {'image', 'label'}, (2,) seed -> {'image': float32 (S, S, 3),
  'label'}, as timm's for the release.

  Order: (decode and) random resized crop, horizontal flip, RandAugment, normalization, random
  erasing; each switchable in `icfg`. `encoded`: images are file contents (string scalars), else
  decoded uint8 (H, W, 3).
  """
  augment = randaugment.parse_randaugment(icfg.randaugment) if icfg.randaugment else None
  scale, ratio = tuple(icfg.crop_scale), tuple(icfg.crop_ratio)

  def preprocess(features, seed):
    image = features['image']
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
    if augment:
      image = randaugment.rand_augment(image, seeds[2], augment)
      image.set_shape([image_size, image_size, 3])
    image = ops.normalize(image)
    if icfg.random_erasing > 0:
      image = ops.random_erasing(image, seeds[3], icfg.random_erasing)
    return {'image': image, 'label': features['label']}

  return preprocess


class ClassificationData(pipeline.HostData):
  """`config`'s dataset, read by this process: `pipeline.Data` for classification.

  Training batches: {'image': float32 (B, S, S, 3) normalized NHWC, 'label': int32 (B,)};
  evaluation batches add 'mask': bool (B,). S = config.image_size, B = config.batch_size (or
  config.eval_batch_size).
  """

  def __init__(self, config: ml_collections.ConfigDict):
    pipeline.hide_accelerators_from_tensorflow()
    check_input_config(config.input)
    self._config = config
    self._source = open_source(config)
    self.train_split = config.get('train_split') or self._source.default_splits[0]
    self.eval_split = config.get('eval_split') or self._source.default_splits[1]
    class_names = self._source.class_names
    self.info = sources.DatasetInfo(
        num_classes=len(class_names),
        num_train_examples=self._source.num_examples(self.train_split),
        num_eval_examples=self._source.num_examples(self.eval_split), class_names=class_names)

  def train_input(self, process_index: int, process_count: int) -> pipeline.TrainInput:
    config = self._config
    share = self._source.share(self.train_split, process_index, process_count)
    return pipeline.TrainInput(
        share, train_preprocess_fn(config.input, config.image_size, share.encoded),
        repeats=int(config.input.repeated_augmentations))

  def local_eval_batches(self, process_index: int, process_count: int
                         ) -> Iterator[pipeline.HostBatch]:
    """Process `process_index`'s local evaluation batches: one pass over its share."""
    config = self._config
    eval_batch = config.get('eval_batch_size') or config.batch_size
    local_batch = pipeline.local_batch_size(eval_batch, process_count, 'eval_batch_size')
    share = self._source.share(self.eval_split, process_index, process_count)

    def preprocess(features):
      image = features['image']
      image = (preprocess_for_eval(image, config.image_size) if share.encoded
               else ops.normalize(image))
      return {'image': image, 'label': features['label']}

    return pipeline.local_eval_batches(
        share, preprocess, local_batch=local_batch, num_batches=pipeline.eval_batch_count(
            self.info.num_eval_examples, process_count, local_batch))
