"""Object detection data: COCO as users hold it, TFDS `coco/2017`, and the demo's digit scenes;
mmdet's training and evaluation transforms on a fixed canvas.

Datasets (`config.dataset`):
  'coco'          the COCO layout under ROOT = `config.data_dir`:
                  annotations/instances_{train,val}2017.json with train2017/ and val2017/ image
                  folders (read with pycocotools). Splits 'train' and 'val'.
  'digit_scenes'  the demo: scenes of handwritten digits written once under `config.data_dir`
                  (default: a cache folder per settings) by `data.digit_scenes.write_scenes`,
                  then read in their COCO layout (`digit_scenes.COCO_LAYOUT`) as 'coco'.
  a TFDS name     a prepared TFDS detection dataset with COCO's features, e.g. 'coco/2017' (boxes
                  only), read from `config.data_dir`. Its evaluation ground truth is collected
                  from the split itself (`TfdsDetectionSource.ground_truth`).

Labels are contiguous, 0 .. K-1, in the order of the category ids; `category_ids[label]` maps
back. Annotations are kept as mmdet 2.x's `CocoDataset` keeps them: boxes with a positive area and
sides of at least 1 pixel; crowd regions apart ('crowd'). Training uses only images with at least
one box (crowds included; with instance masks, at least one non-crowd instance) and both sides of
at least 32 pixels, as mmdet does; evaluation every image of the split. A COCO folder's bad input
is an error naming the annotation file, the image and the annotation: a category id that is not
among the file's categories, a box wholly outside its image (mmdet skips both), a segmentation
that does not decode (instance masks); and a listed image file that is missing.

Instance masks (a detector whose `train_batch_fields` asks for 'gt_mask_crops', Mask R-CNN; COCO
folders only, TFDS `coco/2017` has none): each non-crowd instance's polygon or RLE is decoded on
the host when its image is read, at the original size, and cropped over its box to S × S
(`instance_masks.instance_crops`). Being box-relative, the crop moves with the box: resizing
leaves it as it is, the flip mirrors it; crowds and padding are zeros.

Transforms (`config.input`): decode; resize keeping the aspect ratio to fit `max_size` (long,
short) = (1333, 800) (bilinear; scale min(long_max / long, short_max / short), also no larger than
the canvas; sides rounded to the nearest pixel); mirror left-right with probability 0.5
(training); ImageNet normalization; placed at the top left of the fixed `canvas_size` (H, W),
zero padding. Boxes are scaled, clipped to the image and mirrored with it, and padded to
`max_boxes` with a mask. Multi-scale training (the 3x recipes: `config.input.short_sides`, and
the random-crop policy `crop_short_sides`, `crop_size`) draws each image's scale (and crop) from
its seed: see `Transform`.

Training batches: 'image' float32 (B, H, W, 3); 'boxes' float32 (B, M, 4) (x0, y0, x1, y1) in
canvas pixels; 'labels' int32 (B, M); 'crowd', 'box_mask' bool (B, M); 'image_size' int32 (B, 2)
(height, width of the resized image on the canvas); with instance masks 'gt_mask_crops' uint8
(B, M, S, S) in {0, 1} (a crop per box, S from the detector's field). Evaluation batches:
'image', 'image_size', 'image_id' int32 (B,) (the annotation file's), 'original_size' int32 (B, 2)
(height, width of the original image), 'mask' bool (B,).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence
import weakref

from absl import logging
import ml_collections
import numpy as np
from pycocotools import coco as coco_api
import tensorflow as tf

from secvit_jax.data import digit_scenes
from secvit_jax.data import instance_masks
from secvit_jax.data import ops
from secvit_jax.data import pipeline
from secvit_jax.data import sources
from secvit_jax.evaluation import coco

COCO_FOLDER = 'coco'
DIGIT_SCENES = 'digit_scenes'
# COCO's layout: split -> (image folder, annotation file), relative to ROOT.
COCO_LAYOUT = {'train': ('train2017', 'annotations/instances_train2017.json'),
               'val': ('val2017', 'annotations/instances_val2017.json')}
# The category ids of COCO's 80 detection classes, in label order (TFDS `coco/2017` numbers them
# 0..79 in this order, that of the annotation files).
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
    56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90)
# mmdet drops training images with a side under this many pixels.
MIN_TRAIN_SIDE = 32
# The training batch field of instance masks: uint8 (B, G, M, M), each instance's crop over its
# box (`instance_masks.instance_crops`), what Mask R-CNN's mask targets are resampled from.
MASK_CROPS = 'gt_mask_crops'
# The training batch fields a detector may ask for besides the common ones.
DETECTOR_FIELDS = (MASK_CROPS,)


# ------------------------------------------------------------------------------------------------
# Sources.
# ------------------------------------------------------------------------------------------------


def load_coco(path: str) -> coco_api.COCO:
  """An annotation file read with pycocotools (its progress prints silenced).

  Raises:
    FileNotFoundError: naming the file and the layout expected.
  """
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(
        f'{path} does not exist; a COCO dataset is '
        'ROOT/annotations/instances_{train,val}2017.json with ROOT/train2017/ and ROOT/val2017/ '
        'images, ROOT = config.data_dir')
  with tf.io.gfile.GFile(path) as f:
    return coco.coco_from_dict(json.load(f))


class _Objects(NamedTuple):
  """An image's annotations that mmdet keeps (see the module docstring), in the file's order:
  boxes float32 (n, 4) (x0, y0, x1, y1), labels int32 (n,), crowd bool (n,), and the
  annotations' ids int64 (n,)."""
  boxes: np.ndarray
  labels: np.ndarray
  crowd: np.ndarray
  annotation_ids: np.ndarray


def _coco_objects(ground_truth: coco_api.COCO, image_id: int, label_of: dict[int, int],
                  where: str) -> _Objects:
  """The annotations of an image that mmdet keeps (see the module docstring).

  Raises:
    ValueError: naming `where` (the annotation file), the image and the annotation, for an
      annotation whose category id is not among the file's categories, or whose box lies wholly
      outside its image.
  """
  info = ground_truth.imgs[image_id]
  boxes, labels, crowd, ids = [], [], [], []
  for ann in ground_truth.imgToAnns.get(image_id, []):
    if ann.get('ignore', False):
      continue
    named = f'{where}: annotation {ann["id"]} of image {image_id} ({info["file_name"]})'
    if ann['category_id'] not in label_of:
      raise ValueError(f'{named} has category id {ann["category_id"]}, which is not in the '
                       'file\'s categories')
    x, y, w, h = ann['bbox']
    if ann.get('area', w * h) <= 0 or w < 1 or h < 1:
      continue
    if x >= info['width'] or y >= info['height'] or x + w <= 0 or y + h <= 0:
      raise ValueError(f'{named} has its box {ann["bbox"]} (x, y, width, height) wholly outside '
                       f'the {info["width"]} × {info["height"]} image')
    boxes.append((x, y, x + w, y + h))
    labels.append(label_of[ann['category_id']])
    crowd.append(bool(ann.get('iscrowd', 0)))
    ids.append(ann['id'])
  return _Objects(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int32),
                  np.asarray(crowd, bool), np.asarray(ids, np.int64))


def _ragged(rows: Sequence[np.ndarray], dtype: tf.DType) -> tf.RaggedTensor:
  """One row per example: (n_i, ...) arrays -> a RaggedTensor (examples, None, ...)."""
  values = np.concatenate(rows) if rows else np.zeros((0,), dtype.as_numpy_dtype)
  return tf.RaggedTensor.from_row_lengths(tf.constant(values, dtype),
                                          np.asarray([len(r) for r in rows], np.int64))


class CocoFolderSource(sources.Source):
  """COCO's layout under `root` (see the module docstring); splits 'train' and 'val'.

  Examples: 'image' (the file's contents), 'image_id' int32, 'boxes' float32 (n, 4) (x0, y0, x1,
  y1) in the image's pixels, 'labels' int32 (n,), 'crowd' bool (n,); with `instance_masks`, the
  training examples also 'example' int32, their index for `mask_crops`.

  Args:
    root: ROOT.
    max_boxes: the most annotations (crowds included) an image may have; more is an error naming
      the image.
    layout: split -> (image folder, annotation file) under ROOT: COCO's, or another's such as
      the digit scenes' (`digit_scenes.COCO_LAYOUT`).
    instance_masks: training reads instance masks (Mask R-CNN): only images with a non-crowd
      instance are trained on, and every non-crowd instance's segmentation is checked when the
      split is listed (`instance_masks.check_segmentation`).
  """
  default_splits = ('train', 'val')

  def __init__(self, root: str | None, max_boxes: int,
               layout: Mapping[str, tuple[str, str]] = COCO_LAYOUT, *,
               instance_masks: bool = False):
    if not root:
      raise ValueError("config.dataset='coco' needs config.data_dir, the folder that holds "
                       'annotations/, train2017/ and val2017/')
    self._root = root
    self._max_boxes = max_boxes
    self._layout = dict(layout)
    self._instance_masks = instance_masks

  def annotation_file(self, split: str) -> str:
    if split not in self._layout:
      raise ValueError(f"a COCO folder has splits 'train' and 'val', got {split!r}")
    return os.path.join(self._root, self._layout[split][1])

  def ground_truth(self, split: str) -> coco_api.COCO:
    """The split's annotations, as COCOeval reads them."""
    return _cached_coco(self.annotation_file(split))

  @property
  def category_ids(self) -> tuple[int, ...]:
    return tuple(sorted(self.ground_truth(self.default_splits[0]).cats))

  @property
  def class_names(self) -> tuple[str, ...]:
    cats = self.ground_truth(self.default_splits[0]).cats
    return tuple(cats[i]['name'] for i in self.category_ids)

  def share(self, split, process_index, process_count, training: bool = False):
    """Process `process_index`'s share of `split`; `training`: only the images mmdet trains on
    (see the module docstring)."""
    return self._examples(split, training).share(process_index, process_count,
                                                 with_index=training and self._instance_masks)

  def num_examples(self, split: str, training: bool = False) -> int:
    return len(self._examples(split, training).image_ids)

  def mask_crops(self, split: str, size: int) -> Callable[[sources.Features], sources.Features]:
    """For the training examples of `split` (`share(..., training=True)`, `instance_masks`):
    features -> the features with 'mask_crops' uint8 (n, size, size), each instance's crop over
    its box (`instance_masks.instance_crops`; crowds all zeros), decoded on the host when the
    example is read (as tf.numpy_function)."""
    if not self._instance_masks:
      raise ValueError('mask_crops needs a CocoFolderSource with instance_masks=True')
    examples = self._examples(split, True)
    ground_truth = self.ground_truth(split)

    def crops(example: np.ndarray) -> np.ndarray:
      image_id = int(examples.image_ids[example])
      info = ground_truth.imgs[image_id]
      objects = examples.objects[example]
      segmentations = [None if crowd else ground_truth.anns[int(ann_id)]['segmentation']
                       for ann_id, crowd in zip(objects.annotation_ids, objects.crowd)]
      return instance_masks.instance_crops(segmentations, objects.boxes, info['height'],
                                           info['width'], size)

    def with_crops(features: sources.Features) -> sources.Features:
      found = tf.numpy_function(crops, [features['example']], tf.uint8, stateful=False)
      found.set_shape((None, size, size))
      return {**features, 'mask_crops': found}

    return with_crops

  @functools.lru_cache(maxsize=4)
  def _examples(self, split: str, training: bool) -> _Examples:
    ground_truth = self.ground_truth(split)
    where = self.annotation_file(split)
    label_of = {category: label for label, category in enumerate(self.category_ids)}
    folder = os.path.join(self._root, self._layout[split][0])
    with_masks = training and self._instance_masks
    image_ids, paths, objects = [], [], []
    for image_id in sorted(ground_truth.imgs):
      info = ground_truth.imgs[image_id]
      found = _coco_objects(ground_truth, image_id, label_of, where)
      if len(found.boxes) > self._max_boxes:
        raise ValueError(f'{info["file_name"]} (image id {image_id}) of {split} has '
                         f'{len(found.boxes)} boxes, more than config.max_boxes='
                         f'{self._max_boxes}: raise it')
      usable = ~found.crowd if with_masks else np.ones(len(found.boxes), bool)
      if training and (not usable.any() or min(info['width'], info['height']) < MIN_TRAIN_SIDE):
        continue
      if with_masks:
        for ann_id in found.annotation_ids[usable]:
          reason = instance_masks.check_segmentation(
              ground_truth.anns[int(ann_id)].get('segmentation'), info['height'], info['width'])
          if reason:
            raise ValueError(f'{where}: annotation {ann_id} of image {image_id} '
                             f'({info["file_name"]}) does not decode: {reason}')
      image_ids.append(image_id)
      paths.append(os.path.join(folder, info['file_name']))
      objects.append(found)
    if not image_ids:
      raise ValueError(f'{where} lists no image to {"train on" if training else "evaluate"}'
                       f'{" with a non-crowd instance" if with_masks else ""}')
    _check_files_exist(folder, paths, image_ids, where)
    return _Examples(np.asarray(image_ids, np.int32), paths, objects)


def _check_files_exist(folder: str, paths: Sequence[str], image_ids: Sequence[int],
                       where: str) -> None:
  """Raises FileNotFoundError naming the first of `paths` (files of `folder`) that is missing, with
  its image id and the annotation file `where` that lists it (one listing of the folder)."""
  present = (set(tf.io.gfile.listdir(folder)) if tf.io.gfile.isdir(folder) else set())
  for path, image_id in zip(paths, image_ids):
    if os.path.relpath(path, folder) not in present and not tf.io.gfile.exists(path):
      raise FileNotFoundError(f'{path} (image id {image_id}, listed in {where}) does not exist')


@functools.lru_cache(maxsize=4)
def _cached_coco(path: str) -> coco_api.COCO:
  logging.info('reading %s', path)
  return load_coco(path)


class _Examples:
  """The examples of a split of a COCO folder: image ids, files and objects, in id order."""

  def __init__(self, image_ids: np.ndarray, paths: list[str], objects: list[_Objects]):
    self.image_ids = image_ids
    self.paths = paths
    self.objects = objects

  def share(self, process_index: int, process_count: int,
            with_index: bool = False) -> sources.FileShare:
    """`with_index`: the examples carry 'example', their index in this listing."""
    mine = slice(process_index, None, process_count)
    objects = self.objects[mine]
    index = {'example': np.arange(len(self.paths), dtype=np.int32)[mine]} if with_index else {}
    return sources.FileShare(
        {'image': self.paths[mine]},
        {'image_id': self.image_ids[mine],
         'boxes': _ragged([found.boxes for found in objects], tf.float32),
         'labels': _ragged([found.labels for found in objects], tf.int32),
         'crowd': _ragged([found.crowd for found in objects], tf.bool), **index})


class TfdsDetectionSource(sources.Source):
  """A prepared TFDS detection dataset with COCO's features ('image', 'image/id' and 'objects'
  with 'bbox' (normalized ymin, xmin, ymax, xmax), 'label', 'is_crowd'), e.g. 'coco/2017'.

  Examples as `CocoFolderSource`'s; every image of a split, also for training (the dataset's
  images without boxes contribute negatives only).
  """

  def __init__(self, name: str, data_dir: str | None, shuffle_buffer: int):
    self._name = name
    self._builder = sources.prepared_tfds_builder(name, data_dir)
    self._shuffle_buffer = shuffle_buffer
    features = self._builder.info.features
    objects = features['objects'] if 'objects' in features else {}
    missing = [key for key in ('image', 'image/id') if key not in features] + [
        f'objects/{key}' for key in ('bbox', 'label', 'is_crowd') if key not in objects]
    if missing:
      raise ValueError(f'TFDS dataset {name!r} lacks the features of a COCO detection dataset: '
                       f'{missing}')
    splits = sorted(self._builder.info.splits)
    self.default_splits = ('train', 'validation' if 'validation' in splits else splits[-1])

  @property
  def class_names(self) -> tuple[str, ...]:
    return tuple(self._builder.info.features['objects']['label'].names)

  @property
  def category_ids(self) -> tuple[int, ...]:
    count = len(self.class_names)
    return COCO_CATEGORY_IDS if count == len(COCO_CATEGORY_IDS) else tuple(range(1, count + 1))

  def _split(self, split: str) -> str:
    if split not in self._builder.info.splits:
      raise ValueError(f'TFDS dataset {self._name!r} has no split {split!r}; it has '
                       f'{sorted(self._builder.info.splits)}')
    return split

  def share(self, split, process_index, process_count, training: bool = False):
    del training  # Every image, as the module docstring says.

    def features(example):
      image = example['image']
      size = tf.cast(image_shape(image), tf.float32)
      objects = example['objects']
      ymin, xmin, ymax, xmax = tf.unstack(objects['bbox'], axis=-1)
      boxes = tf.stack([xmin * size[1], ymin * size[0], xmax * size[1], ymax * size[0]], axis=-1)
      return {'image': image, 'image_id': tf.cast(example['image/id'], tf.int32),
              'boxes': tf.reshape(boxes, [-1, 4]), 'labels': tf.cast(objects['label'], tf.int32),
              'crowd': tf.cast(objects['is_crowd'], tf.bool)}

    return sources.TfdsShare(
        self._builder, tfds_split_for_process(self._split(split), process_index, process_count),
        features, self._shuffle_buffer, skip_decoding=('image',))

  def num_examples(self, split: str, training: bool = False) -> int:
    return self.share(split, 0, 1, training).num_examples

  def ground_truth(self, split: str) -> coco_api.COCO:
    """The split's annotations as COCOeval reads them, collected from the split (one read, no
    image decoded): boxes in pixels, TFDS's areas, crowds; category ids `category_ids`."""
    return _tfds_ground_truth(self._builder, self._split(split), self.category_ids,
                              self.class_names)


def tfds_split_for_process(split: str, process_index: int, process_count: int) -> Any:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.split_for_jax_process(split, process_index=process_index,
                                    process_count=process_count)


def image_shape(image_bytes: tf.Tensor) -> tf.Tensor:
  """int32 (2,): (height, width) of an encoded image, read from a JPEG's header without
  decoding; other formats are decoded."""
  return tf.cond(tf.io.is_jpeg(image_bytes),
                 lambda: tf.image.extract_jpeg_shape(image_bytes)[:2],
                 lambda: tf.shape(ops.decode_image(image_bytes))[:2])


@functools.lru_cache(maxsize=2)
def _tfds_ground_truth(builder: Any, split: str, category_ids: tuple[int, ...],
                       class_names: tuple[str, ...]) -> coco_api.COCO:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  logging.info('collecting the ground truth of %s %s', builder.name, split)
  ds = builder.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()},
                          read_config=tfds.ReadConfig(try_autocache=False))
  ds = ds.map(lambda ex: {'id': ex['image/id'], 'size': image_shape(ex['image']),
                          'bbox': ex['objects']['bbox'], 'label': ex['objects']['label'],
                          'is_crowd': ex['objects']['is_crowd'],
                          'area': ex['objects'].get('area', tf.zeros_like(ex['objects']['label']))},
              num_parallel_calls=tf.data.AUTOTUNE)
  images, annotations = [], []
  for ex in ds.as_numpy_iterator():
    height, width = (int(x) for x in ex['size'])
    images.append({'id': int(ex['id']), 'height': height, 'width': width})
    for (ymin, xmin, ymax, xmax), label, crowd, area in zip(ex['bbox'], ex['label'],
                                                            ex['is_crowd'], ex['area']):
      w, h = float(xmax - xmin) * width, float(ymax - ymin) * height
      annotations.append({
          'id': len(annotations) + 1, 'image_id': int(ex['id']),
          'category_id': category_ids[int(label)], 'iscrowd': int(crowd),
          'bbox': [float(xmin) * width, float(ymin) * height, w, h],
          'area': float(area) if area > 0 else w * h})
  return coco.coco_from_dict({
      'images': images, 'annotations': annotations,
      'categories': [{'id': i, 'name': name} for i, name in zip(category_ids, class_names)]})


# ------------------------------------------------------------------------------------------------
# Transforms.
# ------------------------------------------------------------------------------------------------


def resized_size(height: tf.Tensor, width: tf.Tensor, max_size: Sequence[int | tf.Tensor],
                 canvas_size: Sequence[int]) -> tf.Tensor:
  """int32 (2,): the (height, width) an image is resized to, as mmcv's `imrescale`: scale
  min(long_max / long, short_max / short) with `max_size` = (long_max, short_max), further
  bounded so that the image fits the canvas; sides round(side · scale)."""
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  long_max, short_max = (tf.cast(x, tf.float32) for x in max_size)
  scale = tf.minimum(long_max / tf.maximum(h, w), short_max / tf.minimum(h, w))
  scale = tf.minimum(scale, tf.minimum(canvas_size[0] / h, canvas_size[1] / w))
  size = tf.cast(tf.floor(tf.stack([h, w]) * scale + 0.5), tf.int32)
  return tf.minimum(tf.maximum(size, 1), tf.constant(list(canvas_size), tf.int32))


def _random_choice(values: Sequence[int], seed: tf.Tensor) -> tf.Tensor:
  """int32 scalar: one of `values`, uniformly."""
  index = tf.random.stateless_uniform([], seed, 0, len(values), dtype=tf.int32)
  return tf.gather(tf.constant(list(values), tf.int32), index)


def _random_int(low: tf.Tensor, high: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """int32 scalar uniform in [low, high], both included."""
  return tf.random.stateless_uniform([], seed, low, high + 1, dtype=tf.int32)


def recrop_masks(crops: tf.Tensor, boxes: tf.Tensor, new_boxes: tf.Tensor) -> tf.Tensor:
  """Instance crops over `boxes` resampled over `new_boxes` (parts of them, e.g. clipped by a
  random crop): bin (i, j) of a new crop reads the old crop bilinearly at the bin's centre (old
  cells clamped at the crop's edge), thresholded >= 0.5, as `detection.masks.mask_targets` reads
  the crops.

  Args:
    crops: uint8 (n, M, M) in {0, 1}.
    boxes, new_boxes: float32 (n, 4) (x0, y0, x1, y1) in the same pixels.

  Returns:
    uint8 (n, M, M) in {0, 1}; the crops as they were where `new_boxes` = `boxes`.
  """
  size = crops.shape[-1]
  cells = tf.range(size, dtype=tf.float32)

  def weights(start, end, new_start, new_end):  # (n,) each -> (n, M new bins, M old cells).
    centres = new_start[:, None] + (cells + 0.5) / size * (new_end - new_start)[:, None]
    coords = (centres - start[:, None]) / tf.maximum(end - start, 1e-6)[:, None] * size - 0.5
    coords = tf.clip_by_value(coords, 0.0, size - 1.0)
    return tf.maximum(0.0, 1.0 - tf.abs(coords[:, :, None] - cells))

  old, new = tf.unstack(boxes, axis=-1), tf.unstack(new_boxes, axis=-1)
  rows = weights(old[1], old[3], new[1], new[3])
  columns = weights(old[0], old[2], new[0], new[2])
  values = tf.einsum('nim,nmk,njk->nij', rows, tf.cast(crops, tf.float32), columns)
  return tf.cast(values >= 0.5, tf.uint8)


def _pad_boxes(boxes: tf.Tensor, labels: tf.Tensor, crowd: tf.Tensor, max_boxes: int,
               mask_crops: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
  """The boxes and their fields padded to `max_boxes`; `mask_crops` (n, M, M), when given, as
  'gt_mask_crops' (max_boxes, M, M), padded with zeros."""
  count = tf.shape(labels)[0]
  check = tf.debugging.assert_less_equal(
      count, max_boxes, message=f'an image has more boxes than config.max_boxes={max_boxes}: '
      'raise it')
  with tf.control_dependencies([check]):
    pad = max_boxes - count
  padded = {'boxes': tf.pad(boxes, [[0, pad], [0, 0]]), 'labels': tf.pad(labels, [[0, pad]]),
            'crowd': tf.pad(crowd, [[0, pad]]),
            'box_mask': tf.range(max_boxes) < count}
  if mask_crops is not None:
    padded['gt_mask_crops'] = tf.pad(mask_crops, [[0, pad], [0, 0], [0, 0]])
  return padded


class Transform:
  """The training and evaluation transforms (see the module docstring).

  Args:
    canvas_size: (H, W) of the canvas.
    max_size: (long, short): the resized image fits them.
    hflip: training mirrors with probability 0.5.
    max_boxes: ground-truth boxes per training example, padded.
    encoded: images are file contents (string scalars), else decoded uint8 (H, W, 3).
    short_sides: multi-scale training (mmdet's Resize in 'value' mode): each training image is
      resized to fit (max_size[0], a short side drawn from these); () keeps `max_size`.
    crop_short_sides: with `short_sides`, DENSE.md's 3x policy (b) for half the training images:
      resized to fit (max_size[0], one of these), randomly cropped to a height and width each
      drawn in `crop_size` (at most the side), then resized as the others; boxes clipped to the
      crop and those left empty dropped (mmdet's RandomCrop, allow_negative_crop), their mask
      crops resampled over the clipped boxes (`recrop_masks`). () never.
    crop_size: (min, max) side of policy (b)'s crop.
  """

  def __init__(self, canvas_size: Sequence[int], max_size: Sequence[int], *, hflip: bool = False,
               max_boxes: int = 100, encoded: bool = False, short_sides: Sequence[int] = (),
               crop_short_sides: Sequence[int] = (), crop_size: Sequence[int] = (384, 600)):
    self.canvas_size = tuple(int(x) for x in canvas_size)
    self.max_size = tuple(int(x) for x in max_size)
    self.hflip = hflip
    self.max_boxes = max_boxes
    self.encoded = encoded
    self.short_sides = tuple(int(x) for x in short_sides)
    self.crop_short_sides = tuple(int(x) for x in crop_short_sides)
    self.crop_size = tuple(int(x) for x in crop_size)
    if min(self.short_sides + self.crop_short_sides, default=1) < 1:
      raise ValueError('config.input.short_sides and crop_short_sides must be positive, got '
                       f'{self.short_sides} and {self.crop_short_sides}')
    if self.crop_short_sides and not self.short_sides:
      raise ValueError('config.input.crop_short_sides needs config.input.short_sides (the resize '
                       'after the crop)')
    if len(self.crop_size) != 2 or not 1 <= self.crop_size[0] <= self.crop_size[1]:
      raise ValueError(f'config.input.crop_size must be (min, max) with 1 <= min <= max, got '
                       f'{tuple(crop_size)}')
    if len(self.canvas_size) != 2 or min(self.canvas_size) < 32:
      raise ValueError('config.input.canvas_size must be (height, width), each >= 32, got '
                       f'{tuple(canvas_size)}')
    if len(self.max_size) != 2 or self.max_size[0] < self.max_size[1] or min(self.max_size) < 1:
      raise ValueError('config.input.max_size must be (long side, short side), long >= short > 0, '
                       f'got {tuple(max_size)}')

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, encoded: bool) -> Transform:
    """`config.input`'s `canvas_size`, `max_size`, `hflip`, (optional) `short_sides`,
    `crop_short_sides` and `crop_size`, and `config.max_boxes`."""
    return cls(config.input.canvas_size, config.input.max_size, hflip=bool(config.input.hflip),
               max_boxes=int(config.max_boxes), encoded=encoded,
               short_sides=config.input.get('short_sides', ()),
               crop_short_sides=config.input.get('crop_short_sides', ()),
               crop_size=config.input.get('crop_size', (384, 600)))

  def _resize(self, image: tf.Tensor, short_side: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(float32 image resized to fit (max_size[0], `short_side`) and the canvas, rounded as cv2
    rounds uint8; its int32 (h, w))."""
    shape = tf.shape(image)[:2]
    size = resized_size(shape[0], shape[1], (self.max_size[0], short_side), self.canvas_size)
    resized = tf.image.resize(image, size, method='bilinear', antialias=False)
    return tf.round(tf.clip_by_value(resized, 0.0, 255.0)), size

  def _random_crop(self, image: tf.Tensor, boxes: tf.Tensor, fields: dict[str, tf.Tensor],
                   seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, dict[str, tf.Tensor]]:
    """Policy (b)'s first resize and crop (see the class docstring): (image, boxes in its pixels,
    `fields` of the boxes kept, 'mask_crops' resampled)."""
    scale_seed, height_seed, width_seed, top_seed, left_seed = (
        tf.random.experimental.stateless_fold_in(seed, k) for k in range(5))
    original = tf.cast(tf.shape(image)[:2], tf.float32)
    image, size = self._resize(image, _random_choice(self.crop_short_sides, scale_seed))
    factor = tf.cast(size, tf.float32) / original
    low, high = self.crop_size
    crop_h = _random_int(tf.minimum(size[0], low), tf.minimum(size[0], high), height_seed)
    crop_w = _random_int(tf.minimum(size[1], low), tf.minimum(size[1], high), width_seed)
    top = _random_int(0, size[0] - crop_h, top_seed)
    left = _random_int(0, size[1] - crop_w, left_seed)
    image = tf.image.crop_to_bounding_box(image, top, left, crop_h, crop_w)
    offset = tf.cast(tf.stack([left, top, left, top]), tf.float32)
    moved = boxes * tf.stack([factor[1], factor[0], factor[1], factor[0]]) - offset
    limit = tf.cast(tf.stack([crop_w, crop_h, crop_w, crop_h]), tf.float32)
    clipped = tf.clip_by_value(moved, 0.0, limit)
    kept = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    if 'mask_crops' in fields:
      fields = {**fields, 'mask_crops': recrop_masks(fields['mask_crops'], moved, clipped)}
    return (image, tf.boolean_mask(clipped, kept),
            {key: tf.boolean_mask(value, kept) for key, value in fields.items()})

  def _multiscale(self, features: sources.Features, seed: tf.Tensor
                  ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, dict[str, tf.Tensor]]:
    """Multi-scale training's resize, and policy (b) for half the images: (float32 image rounded,
    its int32 (h, w), float32 (n, 4) boxes in its pixels clipped to it, the boxes' 'labels',
    'crowd' (and 'mask_crops'))."""
    image = features['image']
    if self.encoded:
      image = ops.decode_image(image, accurate=False)
    image = tf.cast(image, tf.float32)
    boxes = tf.reshape(features['boxes'], [-1, 4])
    fields = {key: features[key] for key in ('labels', 'crowd', 'mask_crops') if key in features}
    # The seed itself draws the flip (`train`); streams folded from it the rest.
    policy_seed, scale_seed, crop_seed = (
        tf.random.experimental.stateless_fold_in(seed, k) for k in (1, 2, 3))
    if self.crop_short_sides:
      cropping = tf.random.stateless_uniform([], policy_seed) < 0.5
      image, boxes, fields = tf.cond(
          cropping, lambda: self._random_crop(image, boxes, fields, crop_seed),
          lambda: (image, boxes, fields))
    original = tf.cast(tf.shape(image)[:2], tf.float32)
    image, size = self._resize(image, _random_choice(self.short_sides, scale_seed))
    factor = tf.cast(size, tf.float32) / original
    limit = tf.cast(tf.stack([size[1], size[0], size[1], size[0]]), tf.float32)
    boxes = tf.clip_by_value(boxes * tf.stack([factor[1], factor[0], factor[1], factor[0]]),
                             0.0, limit)
    return image, size, boxes, fields

  def _resized(self, image: tf.Tensor, accurate: bool) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(resized float32 image rounded as cv2 rounds uint8, its int32 (h, w), the original's)."""
    if self.encoded:
      image = ops.decode_image(image, accurate=accurate)
    original = tf.shape(image)[:2]
    size = resized_size(original[0], original[1], self.max_size, self.canvas_size)
    resized = tf.image.resize(image, size, method='bilinear', antialias=False)
    return tf.round(tf.clip_by_value(resized, 0.0, 255.0)), size, original

  def _on_canvas(self, image: tf.Tensor) -> tf.Tensor:
    image = tf.image.pad_to_bounding_box(ops.normalize(image), 0, 0, *self.canvas_size)
    image.set_shape(self.canvas_size + (3,))
    return image

  def train(self, features: sources.Features, seed: tf.Tensor) -> sources.Features:
    """Resize, random flip, normalize, canvas; boxes scaled, clipped and flipped alike; with
    'mask_crops' (n, M, M) (crops over the boxes: scaling leaves them as they are), those mirrored
    with the image and padded as 'gt_mask_crops'. With `short_sides`, the resize is drawn (and
    policy (b)'s crop) by `_multiscale`."""
    if self.short_sides:
      image, size, boxes, features = self._multiscale(features, seed)
      height, width = tf.cast(size[0], tf.float32), tf.cast(size[1], tf.float32)
      x0, y0, x1, y1 = tf.unstack(boxes, axis=-1)
    else:
      image, size, original = self._resized(features['image'], accurate=False)
      factor = tf.cast(size, tf.float32) / tf.cast(original, tf.float32)
      height, width = tf.cast(size[0], tf.float32), tf.cast(size[1], tf.float32)
      x0, y0, x1, y1 = tf.unstack(tf.reshape(features['boxes'], [-1, 4]), axis=-1)
      x0, x1 = (tf.clip_by_value(x * factor[1], 0.0, width) for x in (x0, x1))
      y0, y1 = (tf.clip_by_value(y * factor[0], 0.0, height) for y in (y0, y1))
    mask_crops = features.get('mask_crops')
    if self.hflip:
      flip = tf.random.stateless_uniform([], seed) < 0.5
      image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
      x0, x1 = tf.where(flip, width - x1, x0), tf.where(flip, width - x0, x1)
      if mask_crops is not None:
        mask_crops = tf.cond(flip, lambda: tf.reverse(mask_crops, axis=[2]), lambda: mask_crops)
    return {'image': self._on_canvas(image), 'image_size': size,
            **_pad_boxes(tf.stack([x0, y0, x1, y1], axis=-1), features['labels'],
                         features['crowd'], self.max_boxes, mask_crops)}

  def eval(self, features: sources.Features) -> sources.Features:
    """Resize, normalize, canvas; with the image's id (when it has one) and original size."""
    image, size, original = self._resized(features['image'], accurate=True)
    out = {'image': self._on_canvas(image), 'image_size': size, 'original_size': original}
    if 'image_id' in features:
      out['image_id'] = tf.cast(features['image_id'], tf.int32)
    return out


# ------------------------------------------------------------------------------------------------
# The task's data.
# ------------------------------------------------------------------------------------------------


def open_source(config: ml_collections.ConfigDict, instance_masks: bool = False
                ) -> CocoFolderSource | TfdsDetectionSource:
  """The source `config.dataset` names (see the module docstring); `instance_masks`: training
  reads instance masks (`CocoFolderSource`'s argument; TFDS `coco/2017` has none).

  Raises:
    ValueError: for instance masks from a TFDS dataset, saying to use the COCO folder.
  """
  name = config.dataset
  max_boxes = int(config.max_boxes)
  if name == DIGIT_SCENES:
    root = digit_scenes.write_scenes(config.get('data_dir'), config.digit_scenes.to_dict())
    return CocoFolderSource(root, max_boxes, digit_scenes.COCO_LAYOUT,
                            instance_masks=instance_masks)
  if name == COCO_FOLDER:
    return CocoFolderSource(config.get('data_dir'), max_boxes, instance_masks=instance_masks)
  if instance_masks:
    raise ValueError(f'config.dataset={name!r}: TFDS detection datasets have no instance masks; '
                     f"instance segmentation reads the COCO folder: config.dataset='{COCO_FOLDER}' "
                     'with config.data_dir = ROOT of annotations/instances_{train,val}2017.json, '
                     'train2017/, val2017/')
  try:
    return TfdsDetectionSource(name, config.get('data_dir'), int(config.input.shuffle_buffer))
  except sources.UnknownDatasetError as error:
    raise ValueError(f"config.dataset={name!r} is neither '{COCO_FOLDER}', '{DIGIT_SCENES}' nor a "
                     f'TFDS dataset: {error}') from None


def evaluation_reference(
    config: ml_collections.ConfigDict) -> tuple[coco_api.COCO, tuple[int, ...]]:
  """(pycocotools' COCO of `config`'s evaluation split, the category id of each label): what
  COCOeval scores the detections against."""
  source = open_source(config)
  split = config.get('eval_split') or source.default_splits[1]
  return source.ground_truth(split), source.category_ids


# The training streams whose pipeline calls Python (the mask crops' tf.numpy_function).
_PYTHON_STREAMS: weakref.WeakSet[Iterator[pipeline.HostBatch]] = weakref.WeakSet()


@atexit.register
def _close_python_streams() -> None:
  """Closes the training streams that call Python while the interpreter still runs: a tf.data
  iterator destroyed during finalization waits for its tf.numpy_function calls in flight, which
  can no longer take the GIL, and the process would hang at exit."""
  for stream in list(_PYTHON_STREAMS):
    stream.close()


class DetectionData(pipeline.HostData):
  """`config`'s detection dataset, read by this process: `pipeline.Data` for detection (batches
  as the module docstring says), and the category id of each label (`category_ids`).

  Args:
    config: the run's config.
    train_fields: the training batch fields a detector needs besides the common ones
      (`Detector.train_batch_fields`): of `DETECTOR_FIELDS`, e.g. 'gt_mask_crops' (B, G, M, M),
      whose M sets the crops' size.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               train_fields: Mapping[str, Any] | None = None):
    pipeline.hide_accelerators_from_tensorflow()
    Transform.from_config(config, encoded=False)  # Checks the settings before any data is read.
    unknown = sorted(set(train_fields or {}) - set(DETECTOR_FIELDS))
    if unknown:
      raise ValueError(f'the detector asks for training batch fields {unknown} that the detection '
                       f'data does not make (it makes {DETECTOR_FIELDS})')
    crops = (train_fields or {}).get(MASK_CROPS)
    self._mask_crop_size = int(crops.shape[-1]) if crops is not None else None
    self._config = config
    self._source = open_source(config, instance_masks=self._mask_crop_size is not None)
    self.train_split = config.get('train_split') or self._source.default_splits[0]
    self.eval_split = config.get('eval_split') or self._source.default_splits[1]
    self.info = sources.DatasetInfo(
        num_classes=len(self._source.class_names),
        num_train_examples=self._source.num_examples(self.train_split, training=True),
        num_eval_examples=self._source.num_examples(self.eval_split),
        class_names=self._source.class_names)
    self.category_ids = self._source.category_ids

  def train_input(self, process_index: int, process_count: int) -> pipeline.TrainInput:
    """The training share and transform; with instance masks, each example's mask crops are
    decoded (`CocoFolderSource.mask_crops`) before the transform."""
    share = self._source.share(self.train_split, process_index, process_count, training=True)
    transform = Transform.from_config(self._config, share.encoded).train
    if self._mask_crop_size is None:
      return pipeline.TrainInput(share, transform)
    with_crops = self._source.mask_crops(self.train_split, self._mask_crop_size)
    return pipeline.TrainInput(share, lambda features, seed: transform(with_crops(features), seed))

  def local_train_batches(self, process_index: int, process_count: int,
                          start_step: int = 0) -> Iterator[pipeline.HostBatch]:
    stream = super().local_train_batches(process_index, process_count, start_step)
    if self._mask_crop_size is not None:
      _PYTHON_STREAMS.add(stream)
    return stream

  def local_eval_batches(self, process_index: int,
                         process_count: int) -> Iterator[pipeline.HostBatch]:
    config = self._config
    eval_batch = config.get('eval_batch_size') or config.batch_size
    local_batch = pipeline.local_batch_size(eval_batch, process_count, 'eval_batch_size')
    share = self._source.share(self.eval_split, process_index, process_count)
    return pipeline.local_eval_batches(
        share, Transform.from_config(config, share.encoded).eval, local_batch=local_batch,
        num_batches=pipeline.eval_batch_count(self.info.num_eval_examples, process_count,
                                              local_batch))
