"""Semantic segmentation data: label-map datasets, mmseg's training augmentation, evaluation at each
image's own size in shape buckets.

Datasets (`config.dataset`):
  'ade20k'        ADE20K's SceneParsing benchmark as mmseg users hold it, ROOT = `config.data_dir`
                  (.../ADEChallengeData2016): images/{training,validation}/*.jpg and
                  annotations/{training,validation}/*.png, 0 = "other" (ignored), class k + 1 ->
                  label k (`reduce_zero_label`), 150 classes.
  'folder'        a user's own: an image folder and a label-PNG folder per split, paths
                  `config.folder.images` / `config.folder.labels` with '{split}' in them, relative
                  to `config.data_dir`; `config.folder.num_classes`, `ignore_index`,
                  `reduce_zero_label` and `class_names` say what the label values mean.
  'digit_scenes'  the demo's synthetic scenes, written once under `config.data_dir` (default: a
                  cache folder per settings) by `digit_scenes.write_scenes`, then read in their
                  'folder' layout.
  'scene_parse150' is refused: TFDS's dataset of that name is not the 150-class benchmark.
An image and its label map share a name: images/<split>/<name>.<ext> with labels/<split>/<name>.png
(the label map: single-channel 8- or 16-bit or palette PNG of class indices, the image's size).

Training (`config.input`, mmseg's ADE20K pipeline, image and label map transformed together on
the host, with stateless random ops seeded per (seed, step, process, example)): resize keeping the
aspect ratio to fit `scale` times a ratio drawn in `ratio_range` (image bilinear, labels nearest),
random `crop_size` crop retried until no class covers `cat_max_ratio` of the labelled pixels,
horizontal flip, photometric distortion, normalization, padding to `crop_size` (image 0, labels
ignored).

Evaluation (`config.eval`): each image resized keeping its aspect ratio to fit `scale` (sizes
rounded up to a multiple of `size_divisor` when > 1, as mmseg's AlignedResize), placed at the
top-left of a canvas shared by its shape bucket (sizes rounded up to `bucket_multiple`: one
compilation per bucket), its original label map on a label canvas likewise; padding is ignored.
Batches carry the resized and the original size, so that the task resizes the logits back to the
original image and scores there. `mode` 'slide' runs the model on `crop_size` windows at `stride`
instead of the whole image.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import os
from typing import Callable, Iterator, Sequence

from absl import logging
import ml_collections
import numpy as np
from PIL import Image
import tensorflow as tf

from secvit_jax.data import ade20k
from secvit_jax.data import digit_scenes
from secvit_jax.data import ops
from secvit_jax.data import pipeline
from secvit_jax.data import sources

ADE20K = 'ade20k'
FOLDER = 'folder'
DIGIT_SCENES = 'digit_scenes'
DATASETS = (ADE20K, FOLDER, DIGIT_SCENES)
TFDS_SCENE_PARSE = 'scene_parse150'
LABEL_EXTENSION = '.png'


@dataclasses.dataclass(frozen=True)
class LabelFormat:
  """What the values of a dataset's label PNGs mean.

  After `reduce_zero_label` (0 -> ignored, k -> k - 1), a value is a class in [0, num_classes)
  or `ignore_index` (unlabelled: neither trained on nor scored).
  """
  num_classes: int
  ignore_index: int = 255
  reduce_zero_label: bool = False

  def __post_init__(self):
    if self.num_classes < 1:
      raise ValueError(f'a segmentation dataset needs num_classes >= 1, got {self.num_classes}')
    if 0 <= self.ignore_index < self.num_classes:
      raise ValueError(f'the ignore value {self.ignore_index} is one of the {self.num_classes} '
                       'classes')

  def to_dataset_ids(self, classes: np.ndarray) -> np.ndarray:
    """Class indices -> the label values the dataset's own PNGs use for them."""
    return classes + 1 if self.reduce_zero_label else classes


# ------------------------------------------------------------------------------------------------
# Sources.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SplitListing:
  """One split of a segmentation folder: image and label paths and example names, sorted."""
  images: tuple[str, ...]
  labels: tuple[str, ...]
  names: tuple[str, ...]


class SegmentationFolderSource(sources.Source):
  """Images and label PNGs in two folders per split (see the module docstring).

  Args:
    root: the folder the patterns are relative to.
    images, labels: the image and label folders of a split, '{split}' standing for its name.
    splits: (training split, evaluation split).
    label_format: what the label values mean.
    class_names: one per class, or () for '0', '1', ...
  """

  def __init__(self, root: str, *, images: str, labels: str, splits: tuple[str, str],
               label_format: LabelFormat, class_names: Sequence[str] = ()):
    if class_names and len(class_names) != label_format.num_classes:
      raise ValueError(f'{len(class_names)} class names for {label_format.num_classes} classes')
    self._root = root
    self._patterns = (images, labels)
    self.default_splits = tuple(splits)
    self.label_format = label_format
    self._class_names = tuple(class_names) or tuple(
        str(i) for i in range(label_format.num_classes))

  @property
  def class_names(self) -> tuple[str, ...]:
    return self._class_names

  def folders(self, split: str) -> tuple[str, str]:
    """The image folder and the label folder of `split`."""
    return tuple(os.path.join(self._root, pattern.format(split=split))
                 for pattern in self._patterns)

  def listing(self, split: str) -> SplitListing:
    return list_segmentation_folder(*self.folders(split))

  def share(self, split, process_index, process_count):
    listing = self.listing(split)
    return self.share_of(listing, np.arange(len(listing.names))[process_index::process_count])

  def share_of(self, listing: SplitListing, indices: np.ndarray,
               **values: np.ndarray) -> sources.FileShare:
    """The examples `indices` of a split: 'image' and 'label' file contents, 'index' (their
    index in the split) and 'label_path', and any per-example `values` (same order)."""
    indices = np.asarray(indices, np.int64)
    return sources.FileShare(
        {'image': [listing.images[i] for i in indices],
         'label': [listing.labels[i] for i in indices]},
        {'index': indices.astype(np.int32),
         'label_path': np.asarray([listing.labels[i] for i in indices], dtype=object),
         **values})


@functools.lru_cache(maxsize=8)
def list_segmentation_folder(image_dir: str, label_dir: str) -> SplitListing:
  """Every image of `image_dir` (extensions of `sources.IMAGE_EXTENSIONS`) with its label map
  label_dir/<name>.png, sorted by name.

  Raises:
    FileNotFoundError: a folder is missing (naming it), or images lack their label maps (naming
      the first few).
    ValueError: `image_dir` holds no image.
  """
  for directory in (image_dir, label_dir):
    if not tf.io.gfile.isdir(directory):
      raise FileNotFoundError(
          f'{directory} is not a directory; a segmentation dataset has images/<split>/<name>.jpg '
          'and their label maps annotations/<split>/<name>.png (see config.folder)')
  files = sorted(tf.io.gfile.listdir(image_dir))
  names = [os.path.splitext(f)[0] for f in files if f.lower().endswith(sources.IMAGE_EXTENSIONS)]
  images = [os.path.join(image_dir, f) for f in files
            if f.lower().endswith(sources.IMAGE_EXTENSIONS)]
  if not images:
    raise ValueError(f'{image_dir} holds no images (extensions '
                     f'{", ".join(sources.IMAGE_EXTENSIONS)})')
  if len(set(names)) != len(names):
    twice = sorted({n for n in names if names.count(n) > 1})
    raise ValueError(f'{image_dir} holds several images named {twice[:5]} (other extensions); '
                     'each image needs a name of its own')
  label_files = set(tf.io.gfile.listdir(label_dir))
  missing = [name for name in names if name + LABEL_EXTENSION not in label_files]
  if missing:
    raise FileNotFoundError(
        f'{len(missing)} images of {image_dir} have no label map in {label_dir} (expected '
        f'<name>{LABEL_EXTENSION}), e.g. {", ".join(m + LABEL_EXTENSION for m in missing[:5])}')
  labels = [os.path.join(label_dir, name + LABEL_EXTENSION) for name in names]
  return SplitListing(tuple(images), tuple(labels), tuple(names))


def label_format(config: ml_collections.ConfigDict) -> LabelFormat:
  """What the label values of `config.dataset` mean; reads no files."""
  name = config.dataset
  if name == TFDS_SCENE_PARSE:
    raise ValueError(
        "config.dataset='scene_parse150' is TFDS's scene_parse150, which is not the 150-class "
        'ADE20K benchmark: its builder downloads the 2017 Places Challenge instance annotations '
        '(100 "thing" classes, no wall, sky or floor). Use '
        "config.dataset='ade20k' with config.data_dir=.../ADEChallengeData2016, the folder of "
        'images/{training,validation}/*.jpg and annotations/{training,validation}/*.png '
        '(ADEChallengeData2016.zip from the MIT Scene Parsing benchmark)')
  if name not in DATASETS:
    raise ValueError(f'config.dataset={name!r} is not a segmentation dataset; choose one of '
                     f'{", ".join(DATASETS)}')
  if name == ADE20K:
    return LabelFormat(len(ade20k.CLASS_NAMES), 255, reduce_zero_label=True)
  if name == DIGIT_SCENES:
    return LabelFormat(len(digit_scenes.SEGMENTATION_CLASSES))
  folder = config.folder
  if folder.num_classes is None:
    raise ValueError("config.dataset='folder' needs config.folder.num_classes")
  return LabelFormat(int(folder.num_classes), int(folder.ignore_index),
                     bool(folder.reduce_zero_label))


def open_source(config: ml_collections.ConfigDict) -> SegmentationFolderSource:
  """The source `config.dataset` names (see the module docstring); writes the digit scenes
  first if they are not on disk yet."""
  name = config.dataset
  labels = label_format(config)
  root = config.get('data_dir')
  if name == DIGIT_SCENES:
    root = digit_scenes.write_scenes(root, config.digit_scenes.to_dict())
  if not root:
    raise ValueError(f"config.dataset='{name}' needs config.data_dir, the dataset's folder")
  splits = (config.train_split, config.eval_split)
  if name == FOLDER:
    return SegmentationFolderSource(
        root, images=config.folder.images, labels=config.folder.labels, splits=splits,
        label_format=labels, class_names=tuple(config.folder.class_names))
  return SegmentationFolderSource(
      root, images='images/{split}', labels='annotations/{split}', splits=splits,
      label_format=labels,
      class_names=ade20k.CLASS_NAMES if name == ADE20K else digit_scenes.SEGMENTATION_CLASSES)


# ------------------------------------------------------------------------------------------------
# Decoding.
# ------------------------------------------------------------------------------------------------


def _decode_label_png(data: bytes | np.ndarray) -> np.ndarray:
  image = Image.open(io.BytesIO(np.asarray(data).item()))  # Eager calls pass a 0-d array.
  if image.mode not in ('L', 'P', 'I;16', 'I'):
    raise ValueError(f'a label map must be a single-channel PNG of class indices (PIL mode L, P, '
                     f'I;16 or I); this one has mode {image.mode}')
  return np.asarray(image, dtype=np.int32)


def decode_label(label_bytes: tf.Tensor) -> tf.Tensor:
  """A label PNG's values as int32 (H, W): 8- or 16-bit grey values, or a palette image's indices
  (which TensorFlow's decoder would turn into colours), decoded by PIL."""
  label = tf.numpy_function(_decode_label_png, [label_bytes], tf.int32, stateful=False)
  label.set_shape([None, None])
  return label


def decode_example(features: sources.Features, label_format: LabelFormat
                   ) -> tuple[tf.Tensor, tf.Tensor]:
  """(uint8 (H, W, 3) image, int32 (H, W) classes or the ignore value) of an example.

  Raises (when the pipeline runs) InvalidArgumentError naming the label file when the label map's
  size differs from the image's or a value is neither a class nor the ignore value.
  """
  image = ops.decode_image(features['image'])
  label = decode_label(features['label'])
  ignore = label_format.ignore_index
  if label_format.reduce_zero_label:
    label = tf.where((label == 0) | (label == ignore), ignore, label - 1)
  path = features['label_path']
  checks = [
      tf.debugging.assert_equal(tf.shape(label), tf.shape(image)[:2], message=tf.strings.join(
          ['the label map ', path, ' and its image differ in size'])),
      tf.debugging.assert_equal(
          tf.reduce_all((label >= 0) & (label < label_format.num_classes) | (label == ignore)),
          True, message=tf.strings.join([
              'the label map ', path, f' has values outside the classes 0..'
              f'{label_format.num_classes - 1} and the ignore value {ignore}'
              f'{" (after reduce_zero_label)" if label_format.reduce_zero_label else ""}']))]
  with tf.control_dependencies(checks):
    return tf.identity(image), tf.identity(label)


# ------------------------------------------------------------------------------------------------
# Training augmentation.
# ------------------------------------------------------------------------------------------------


def rescaled_size(height, width, scale: Sequence[float]):
  """mmcv's `rescale_size` with keep_ratio: the size of (height, width) resized by
  min(max(scale) / long side, min(scale) / short side), each side int(side · factor + 0.5).
  Works on Python numbers and on tensors (float64 arithmetic)."""
  long_edge, short_edge = max(scale), min(scale)
  if isinstance(height, tf.Tensor):
    h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    factor = tf.minimum(long_edge / tf.maximum(h, w), short_edge / tf.minimum(h, w))
    return (tf.cast(tf.floor(h * factor + 0.5), tf.int32),
            tf.cast(tf.floor(w * factor + 0.5), tf.int32))
  factor = min(long_edge / max(height, width), short_edge / min(height, width))
  return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_pair(image: tf.Tensor, label: tf.Tensor, height, width) -> tuple[tf.Tensor, tf.Tensor]:
  """Image bilinear (OpenCV's INTER_LINEAR: half-pixel centres, no antialiasing; rounded to
  uint8), labels nearest on the same grid of pixel centres, so that the two stay aligned (as PIL's
  NEAREST; OpenCV's INTER_NEAREST, which mmseg uses, samples floor(i · in / out), up to half a
  source pixel up and left of the image's samples)."""
  size = tf.stack([height, width])
  image = tf.image.resize(image, size, method='bilinear', antialias=False)
  image = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)
  label = tf.image.resize(label[..., None], size, method='nearest')[..., 0]
  return image, label


def random_rescale(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor, scale: Sequence[int],
                   ratio_range: Sequence[float]) -> tuple[tf.Tensor, tf.Tensor]:
  """mmseg's `Resize(img_scale=scale, ratio_range=...)`: the scale times a ratio drawn uniformly
  in `ratio_range` (each side truncated), the image resized to fit it keeping its aspect ratio."""
  ratio = tf.random.stateless_uniform([], seed, ratio_range[0], ratio_range[1], tf.float64)
  target = [tf.floor(float(side) * ratio) for side in scale]
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
  factor = tf.minimum(tf.maximum(target[0], target[1]) / tf.maximum(h, w),
                      tf.minimum(target[0], target[1]) / tf.minimum(h, w))
  height = tf.cast(tf.floor(h * factor + 0.5), tf.int32)
  width = tf.cast(tf.floor(w * factor + 0.5), tf.int32)
  return resize_pair(image, label, height, width)


def random_crop(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor, crop_size: Sequence[int],
                cat_max_ratio: float, ignore_index: int,
                attempts: int = 10) -> tuple[tf.Tensor, tf.Tensor]:
  """mmseg's `RandomCrop(crop_size, cat_max_ratio)`: a window of crop_size (smaller where the
  image is) placed uniformly; while fewer than two classes are in it or one class covers
  `cat_max_ratio` or more of its labelled pixels, another is drawn, `attempts` times at most
  (the last one drawn is kept)."""
  shape = tf.shape(image)
  crop_h, crop_w = tf.minimum(crop_size[0], shape[0]), tf.minimum(crop_size[1], shape[1])
  seeds = tf.random.experimental.stateless_split(seed, attempts + 1)

  def window(i):
    corner_seeds = tf.random.experimental.stateless_split(seeds[i], 2)
    return tf.stack([
        tf.random.stateless_uniform([], corner_seeds[0], 0, shape[0] - crop_h + 1, tf.int32),
        tf.random.stateless_uniform([], corner_seeds[1], 0, shape[1] - crop_w + 1, tf.int32)])

  def balanced(corner):
    crop = label[corner[0]:corner[0] + crop_h, corner[1]:corner[1] + crop_w]
    counts = tf.math.bincount(tf.boolean_mask(crop, crop != ignore_index))
    total = tf.reduce_sum(counts)
    return ((tf.math.count_nonzero(counts) > 1) &
            (tf.cast(tf.reduce_max(tf.concat([counts, [0]], 0)), tf.float64)
             < cat_max_ratio * tf.cast(total, tf.float64)))

  corner = window(0)
  if cat_max_ratio < 1.0:
    def body(i, corner, done):
      ok = balanced(corner)
      return i + 1, tf.where(ok, corner, window(tf.minimum(i + 1, attempts))), ok

    _, corner, _ = tf.while_loop(lambda i, corner, done: (i < attempts) & ~done, body,
                                 (tf.constant(0), corner, tf.constant(False)))
  return (image[corner[0]:corner[0] + crop_h, corner[1]:corner[1] + crop_w],
          label[corner[0]:corner[0] + crop_h, corner[1]:corner[1] + crop_w])


def photometric_distortion(image: tf.Tensor, seed: tf.Tensor, brightness_delta: float = 32,
                           contrast_range: Sequence[float] = (0.5, 1.5),
                           saturation_range: Sequence[float] = (0.5, 1.5),
                           hue_delta: int = 18) -> tf.Tensor:
  """mmseg's `PhotoMetricDistortion` on a uint8 (H, W, 3) image, returning uint8.

  Each with probability 0.5, in this order: brightness (add a value in ±brightness_delta),
  contrast (multiply by a factor in contrast_range) either here or last (even odds), saturation
  (multiply HSV saturation), hue (shift by an integer in [-hue_delta, hue_delta) of OpenCV's 180
  hue steps); results are clipped and truncated to integers after each step as mmseg's are. The
  HSV steps run in floating point (mmseg rounds HSV to 8 bits in OpenCV).
  """
  seeds = tf.random.experimental.stateless_split(seed, 10)
  coin = lambda i: tf.random.stateless_uniform([], seeds[i]) < 0.5
  uniform = lambda i, low, high: tf.random.stateless_uniform([], seeds[i], low, high)
  to_uint8 = lambda x: tf.floor(tf.clip_by_value(x, 0.0, 255.0))

  def maybe(i, transform, x):
    return tf.cond(coin(i), lambda: transform(x), lambda: x)

  def in_hsv(transform):
    def apply(x):
      hsv = tf.image.rgb_to_hsv(x / 255.0)
      return tf.round(tf.image.hsv_to_rgb(transform(hsv)) * 255.0)
    return apply

  def contrast(x):
    return maybe(2, lambda y: to_uint8(y * uniform(3, *contrast_range)), x)

  def saturation(hsv):
    s = tf.clip_by_value(hsv[..., 1] * uniform(5, *saturation_range), 0.0, 1.0)
    return tf.stack([hsv[..., 0], s, hsv[..., 2]], axis=-1)

  def hue(hsv):
    shift = tf.random.stateless_uniform([], seeds[7], -hue_delta, hue_delta, tf.int32)
    h = tf.math.floormod(hsv[..., 0] + tf.cast(shift, tf.float32) / 180.0, 1.0)
    return tf.stack([h, hsv[..., 1], hsv[..., 2]], axis=-1)

  x = tf.cast(image, tf.float32)
  x = maybe(0, lambda y: to_uint8(y + uniform(1, -brightness_delta, brightness_delta)), x)
  contrast_first = coin(8)
  x = tf.cond(contrast_first, lambda: contrast(x), lambda: x)
  x = maybe(4, in_hsv(saturation), x)
  x = maybe(6, in_hsv(hue), x)
  x = tf.cond(contrast_first, lambda: x, lambda: contrast(x))
  return tf.cast(x, tf.uint8)


def pad_to(image: tf.Tensor, label: tf.Tensor, size: Sequence[int], ignore_index: int,
           image_value: float = 0.0) -> tuple[tf.Tensor, tf.Tensor]:
  """Pads (H, W, C) `image` and (H, W) `label` at the bottom and right to `size` (H, W no
  larger): the image with `image_value`, the labels with the ignore value."""
  shape = tf.shape(label)
  padding = [[0, size[0] - shape[0]], [0, size[1] - shape[1]]]
  image = tf.pad(image, padding + [[0, 0]], constant_values=image_value)
  label = tf.pad(label, padding, constant_values=ignore_index)
  image.set_shape([size[0], size[1], 3])
  label.set_shape([size[0], size[1]])
  return image, label


def check_input_config(icfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first invalid field of `config.input`."""
  if len(icfg.scale) != 2 or min(icfg.scale) <= 0:
    raise ValueError(f'config.input.scale must be two positive sizes, got {tuple(icfg.scale)}')
  low, high = icfg.ratio_range
  if not 0 < low <= high:
    raise ValueError(f'config.input.ratio_range must satisfy 0 < min <= max, got '
                     f'{tuple(icfg.ratio_range)}')
  if len(icfg.crop_size) != 2 or min(icfg.crop_size) < 1:
    raise ValueError(f'config.input.crop_size must be two sizes >= 1, got '
                     f'{tuple(icfg.crop_size)}')
  if not 0 < icfg.cat_max_ratio <= 1:
    raise ValueError(f'config.input.cat_max_ratio must be in (0, 1] (1: off), got '
                     f'{icfg.cat_max_ratio}')


def train_preprocess_fn(icfg: ml_collections.ConfigDict, label_format: LabelFormat
                        ) -> Callable[[sources.Features, tf.Tensor], sources.Features]:
  """The training transform (see the module docstring): a share's features and a (2,) seed ->
  {'image': float32 (S_h, S_w, 3) normalized, 'label': int32 (S_h, S_w)}, S = crop_size."""
  crop_size = tuple(int(s) for s in icfg.crop_size)
  ignore = label_format.ignore_index

  def preprocess(features, seed):
    image, label = decode_example(features, label_format)
    seeds = tf.random.experimental.stateless_split(seed, 4)
    image, label = random_rescale(image, label, seeds[0], tuple(icfg.scale),
                                  tuple(icfg.ratio_range))
    image, label = random_crop(image, label, seeds[1], crop_size, float(icfg.cat_max_ratio),
                               ignore)
    if icfg.hflip:
      flip = tf.random.stateless_uniform([], seeds[2]) < 0.5
      image, label = tf.cond(flip, lambda: (image[:, ::-1], label[:, ::-1]),
                             lambda: (image, label))
    if icfg.photometric:
      image = photometric_distortion(image, seeds[3])
    image, label = pad_to(ops.normalize(image), label, crop_size, ignore)
    return {'image': image, 'label': label}

  return preprocess


# ------------------------------------------------------------------------------------------------
# Evaluation: sizes, shape buckets, batches.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalBucket:
  """Evaluation examples that share one input canvas and one label canvas (one compilation)."""
  canvas: tuple[int, int]  # (H, W) of the images, each at the top-left.
  label_canvas: tuple[int, int]  # (H, W) of the original label maps.
  indices: np.ndarray  # int64, the examples' indices in the split.
  sizes: np.ndarray  # int32 (N, 2): each image's resized (H, W).
  original_sizes: np.ndarray  # int32 (N, 2): each image's own (H, W).


def image_sizes(paths: Sequence[str]) -> np.ndarray:
  """int32 (N, 2): each image file's (height, width), from its header."""
  def size(path):
    with tf.io.gfile.GFile(path, 'rb') as f:
      width, height = Image.open(f).size
    return height, width

  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    return np.asarray(list(pool.map(size, paths)), np.int32).reshape(-1, 2)


def eval_size(height: int, width: int, ecfg: ml_collections.ConfigDict) -> tuple[int, int]:
  """The size an image of (height, width) is evaluated at: rescaled to fit `ecfg.scale` keeping
  its aspect ratio, then rounded up to a multiple of `ecfg.size_divisor` (if > 1)."""
  height, width = rescaled_size(height, width, tuple(ecfg.scale))
  divisor = max(1, int(ecfg.size_divisor))
  return -(-height // divisor) * divisor, -(-width // divisor) * divisor


def plan_eval_buckets(original_sizes: np.ndarray, ecfg: ml_collections.ConfigDict
                      ) -> list[EvalBucket]:
  """Groups a split's images by canvas shapes (see `EvalBucket`), largest canvases first.

  Canvas sides are the evaluated (and original) sizes rounded up to `ecfg.bucket_multiple`; in
  'slide' mode the input canvas is at least `ecfg.crop_size`.
  """
  multiple = int(ecfg.bucket_multiple)
  if multiple < 1:
    raise ValueError(f'config.eval.bucket_multiple must be >= 1, got {multiple}')
  round_up = lambda n: -(-int(n) // multiple) * multiple
  groups: dict[tuple[tuple[int, int], tuple[int, int]], list[int]] = {}
  sizes = np.asarray([eval_size(h, w, ecfg) for h, w in original_sizes], np.int32).reshape(-1, 2)
  for index, ((h, w), (oh, ow)) in enumerate(zip(sizes, original_sizes)):
    canvas = (round_up(h), round_up(w))
    if ecfg.mode == 'slide':
      canvas = (max(canvas[0], ecfg.crop_size[0]), max(canvas[1], ecfg.crop_size[1]))
    groups.setdefault((canvas, (round_up(oh), round_up(ow))), []).append(index)
  buckets = []
  for (canvas, label_canvas), indices in sorted(
      groups.items(), key=lambda item: (-item[0][0][0] * item[0][0][1], item[0])):
    indices = np.asarray(indices, np.int64)
    buckets.append(EvalBucket(canvas, label_canvas, indices, sizes[indices],
                              np.asarray(original_sizes, np.int32)[indices]))
  return buckets


def check_eval_config(ecfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first invalid field of `config.eval`."""
  if ecfg.mode not in ('whole', 'slide'):
    raise ValueError(f"config.eval.mode must be 'whole' or 'slide', got {ecfg.mode!r}")
  if len(ecfg.scale) != 2 or min(ecfg.scale) <= 0:
    raise ValueError(f'config.eval.scale must be two positive sizes, got {tuple(ecfg.scale)}')
  if ecfg.mode == 'slide' and (min(ecfg.crop_size) < 1 or min(ecfg.stride) < 1):
    raise ValueError(f'config.eval.crop_size and stride must be >= 1, got '
                     f'{tuple(ecfg.crop_size)}, {tuple(ecfg.stride)}')


def eval_image(image: tf.Tensor, size) -> tf.Tensor:
  """uint8 (H, W, 3) -> the float32 (size, 3) normalized input of evaluation: resized bilinearly
  (OpenCV's INTER_LINEAR, rounded to uint8 as mmcv's), then normalized."""
  image = tf.image.resize(image, size, method='bilinear', antialias=False)
  return ops.normalize(tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8))


def eval_preprocess_fn(bucket: EvalBucket, label_format: LabelFormat
                       ) -> Callable[[sources.Features], sources.Features]:
  """An example of `bucket` -> {'image': float32 canvas (H, W, 3), normalized, zero-padded;
  'label': int32 label canvas, the original labels padded with the ignore value; 'size',
  'original_size': int32 (2,); 'index': int32}."""
  def preprocess(features):
    image, label = decode_example(features, label_format)
    size = features['size']
    image = eval_image(image, size)
    canvas_h, canvas_w = bucket.canvas
    image = tf.pad(image, [[0, canvas_h - size[0]], [0, canvas_w - size[1]], [0, 0]])
    image.set_shape([canvas_h, canvas_w, 3])
    shape = tf.shape(label)
    label = tf.pad(label, [[0, bucket.label_canvas[0] - shape[0]],
                           [0, bucket.label_canvas[1] - shape[1]]],
                   constant_values=label_format.ignore_index)
    label.set_shape(bucket.label_canvas)
    return {'image': image, 'label': label, 'size': size, 'original_size': shape,
            'index': features['index']}

  return preprocess


class SegmentationData(pipeline.HostData):
  """`config`'s segmentation dataset, read by this process: `pipeline.Data` for segmentation.

  Training batches: {'image': float32 (B, S_h, S_w, 3) normalized NHWC, 'label': int32 (B, S_h,
  S_w), the ignore value where unlabelled}, S = config.input.crop_size. Evaluation batches, one
  shape bucket after the other: {'image': float32 (B, H, W, 3), 'label': int32 (B, H_l, W_l),
  'size', 'original_size': int32 (B, 2), 'index': int32 (B,), 'mask': bool (B,)}.
  """

  def __init__(self, config: ml_collections.ConfigDict):
    pipeline.hide_accelerators_from_tensorflow()
    check_input_config(config.input)
    check_eval_config(config.eval)
    self._config = config
    self.source = open_source(config)
    self.label_format = self.source.label_format
    self.train_split, self.eval_split = self.source.default_splits
    self.info = sources.DatasetInfo(
        num_classes=self.label_format.num_classes,
        num_train_examples=len(self.source.listing(self.train_split).names),
        num_eval_examples=len(self.source.listing(self.eval_split).names),
        class_names=self.source.class_names)

  @functools.cached_property
  def eval_buckets(self) -> list[EvalBucket]:
    """The evaluation split's shape buckets (image headers are read once, on first use)."""
    listing = self.source.listing(self.eval_split)
    sizes = image_sizes(listing.images)
    buckets = plan_eval_buckets(sizes, self._config.eval)
    real = float(np.sum(np.prod(np.concatenate([b.sizes for b in buckets]), axis=-1)))
    canvases = float(sum(len(b.indices) * np.prod(b.canvas) for b in buckets))
    logging.info('evaluation: %d images in %d shape buckets (compilations), %.1f%% of the input '
                 'canvases padding', len(sizes), len(buckets), 100 * (1 - real / canvases))
    return buckets

  def train_input(self, process_index: int, process_count: int) -> pipeline.TrainInput:
    return pipeline.TrainInput(self.source.share(self.train_split, process_index, process_count),
                               train_preprocess_fn(self._config.input, self.label_format))

  def local_eval_batches(self, process_index: int, process_count: int
                         ) -> Iterator[pipeline.HostBatch]:
    """One pass over this process's evaluation examples, bucket after bucket; every process
    yields the same number of batches of each bucket."""
    config = self._config
    eval_batch = config.get('eval_batch_size') or config.batch_size
    local_batch = pipeline.local_batch_size(eval_batch, process_count, 'eval_batch_size')
    listing = self.source.listing(self.eval_split)
    for bucket in self.eval_buckets:
      mine = slice(process_index, None, process_count)
      share = self.source.share_of(listing, bucket.indices[mine], size=bucket.sizes[mine])
      yield from pipeline.local_eval_batches(
          share, eval_preprocess_fn(bucket, self.label_format), local_batch=local_batch,
          num_batches=pipeline.eval_batch_count(len(bucket.indices), process_count, local_batch))
