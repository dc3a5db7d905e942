"""Tests of the instance masks in the detection data: COCO's polygons and RLEs read from a COCO
folder into Mask R-CNN's training crops, moved with the boxes, and each bad input's error."""

import copy
import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from pycocotools import mask as mask_api
import pytest

from secvit_jax.data import detection as data_lib
from secvit_jax.data import instance_masks
from secvit_jax.data import ops
from secvit_jax.detection import masks as masks_lib

import tensorflow as tf  # pylint: disable=g-bad-import-order

CROP = 16  # The crops' side in these tests (Mask R-CNN's default is 112).
CATEGORIES = [{'id': 1, 'name': 'square'}, {'id': 2, 'name': 'ring'}]
MEAN, STD = np.array(ops.IMAGENET_MEAN), np.array(ops.IMAGENET_STD)


def _rectangles(height, width, *rectangles):
  """bool (height, width), True on each (x0, y0, x1, y1) rectangle (pixels x0..x1-1, y0..y1-1)."""
  bitmap = np.zeros((height, width), bool)
  for x0, y0, x1, y1 in rectangles:
    bitmap[y0:y1, x0:x1] = True
  return bitmap


def _ring(height, width):
  """bool (height, width): a ring around (36, 30), clipped by the image's right and bottom."""
  ys, xs = np.mgrid[:height, :width] + 0.5
  distance = np.hypot(xs - 36, ys - 30)
  return (distance < 14) & (distance > 5)


def _uncompressed_rle(bitmap):
  """COCO's uncompressed RLE of a bitmap: run lengths in column-major order, from a run of 0s."""
  flat = bitmap.T.reshape(-1).astype(np.int8)
  changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
  return {'size': list(bitmap.shape), 'counts': np.diff(np.concatenate([[0], changes])).tolist()}


def _compressed_rle(bitmap):
  rle = mask_api.encode(np.asfortranarray(bitmap, np.uint8))
  return {'size': list(bitmap.shape), 'counts': rle['counts'].decode('ascii')}


def _image_file(image_id, height, width):
  """A constant image whose value encodes its id (10 + 3 × id)."""
  return np.full((height, width, 3), 10 + 3 * image_id, np.uint8)


def _write_split(root, folder, images, annotations, *, skip_files=()):
  os.makedirs(os.path.join(root, folder), exist_ok=True)
  os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
  for image in images:
    if image['id'] not in skip_files:
      Image.fromarray(_image_file(image['id'], image['height'], image['width'])).save(
          os.path.join(root, folder, image['file_name']))
  for number, ann in enumerate(annotations, 1):
    ann.setdefault('iscrowd', 0)
    ann.setdefault('area', ann['bbox'][2] * ann['bbox'][3])
    ann['id'] = 100 + number
  with open(os.path.join(root, 'annotations', f'instances_{folder}.json'), 'w') as f:
    json.dump({'images': images, 'annotations': annotations, 'categories': CATEGORIES}, f)


def _image(image_id, height, width):
  return {'id': image_id, 'file_name': f'{image_id:012d}.png', 'height': height, 'width': width}


# The training split: image 1 (40 × 60) with a polygon of two overlapping rectangles (annotation
# 101), an uncompressed RLE (102) and a crowd (103); image 2 (48 × 48) with a compressed RLE whose
# box crosses the image's edge (104); image 3 (40 × 40) with only a crowd (105).
TWO_RECTANGLES = (10, 5, 20, 15), (16, 10, 30, 20)
L_SHAPE = (35, 20, 40, 35), (35, 30, 50, 35)
TRAIN_IMAGES = [_image(1, 40, 60), _image(2, 48, 48), _image(3, 40, 40)]
TRAIN_ANNOTATIONS = [
    {'image_id': 1, 'category_id': 1, 'bbox': [10, 5, 20, 15],
     'segmentation': [[x0, y0, x1, y0, x1, y1, x0, y1] for x0, y0, x1, y1 in TWO_RECTANGLES]},
    {'image_id': 1, 'category_id': 2, 'bbox': [35, 20, 15, 15],
     'segmentation': _uncompressed_rle(_rectangles(40, 60, *L_SHAPE))},
    {'image_id': 1, 'category_id': 1, 'bbox': [0, 0, 10, 10], 'iscrowd': 1,
     'segmentation': _uncompressed_rle(_rectangles(40, 60, (0, 0, 10, 10)))},
    {'image_id': 2, 'category_id': 2, 'bbox': [22, 16, 28, 28],
     'segmentation': _compressed_rle(_ring(48, 48))},
    {'image_id': 3, 'category_id': 1, 'bbox': [5, 5, 20, 20], 'iscrowd': 1,
     'segmentation': _uncompressed_rle(_rectangles(40, 40, (5, 5, 25, 25)))},
]
VAL_IMAGES = [_image(4, 40, 40)]
VAL_ANNOTATIONS = [{'image_id': 4, 'category_id': 1, 'bbox': [4, 4, 10, 10],
                    'segmentation': [[4, 4, 14, 4, 14, 14, 4, 14]]}]


def _write_folder(root, train_annotations=None, **kwargs):
  _write_split(root, 'train2017', TRAIN_IMAGES,
               copy.deepcopy(train_annotations or TRAIN_ANNOTATIONS), **kwargs)
  _write_split(root, 'val2017', VAL_IMAGES, copy.deepcopy(VAL_ANNOTATIONS))
  return root


@pytest.fixture(scope='module')
def coco_root(tmp_path_factory):
  return _write_folder(str(tmp_path_factory.mktemp('instances')))


def _expected_crops():
  """Image id -> uint8 (n, CROP, CROP): the crops of its kept instances, from the known shapes
  (the crowd's all zeros; image 2's box clipped to the image)."""
  def crop(bitmap, box):
    return masks_lib.crop_masks_to_boxes(bitmap[None], np.asarray([box], np.float32), CROP)[0]

  return {1: np.stack([crop(_rectangles(40, 60, *TWO_RECTANGLES), (10, 5, 30, 20)),
                       crop(_rectangles(40, 60, *L_SHAPE), (35, 20, 50, 35)),
                       np.zeros((CROP, CROP), np.uint8)]),
          2: crop(_ring(48, 48), (22, 16, 48, 44))[None]}


def _mask_fields(batch_size=1, max_boxes=4):
  return {'gt_mask_crops': jax.ShapeDtypeStruct((batch_size, max_boxes, CROP, CROP), jnp.uint8)}


def _config(data_dir, **fields):
  config = importlib.import_module('configs.det_demo').get_config()
  config.dataset = 'coco'
  config.data_dir = data_dir
  config.input.canvas_size = (64, 96)
  config.input.max_size = (96, 64)
  config.input.hflip = True
  config.max_boxes = 4
  config.batch_size = 1
  config.update(fields)
  return config


def test_the_reader_decodes_polygons_and_rles_into_crops_of_the_kept_instances(coco_root):
  source = data_lib.CocoFolderSource(coco_root, 4, instance_masks=True)
  with_crops = source.mask_crops('train', CROP)
  share = source.share('train', 0, 1, training=True)
  examples = [{k: v.numpy() for k, v in with_crops(features).items()}
              for _, features in share.elements(None, 0)]
  # Image 3 holds only a crowd: no mask to learn, not trained on.
  assert [int(e['image_id']) for e in examples] == [1, 2]
  for example in examples:
    expected = _expected_crops()[int(example['image_id'])]
    assert example['mask_crops'].dtype == np.uint8
    np.testing.assert_array_equal(example['mask_crops'], expected)
    assert expected[0].any()
  np.testing.assert_array_equal(examples[0]['crowd'], [False, False, True])
  # Without instance masks (RetinaNet), the same images as before: image 3's crowd is a box.
  boxes_only = data_lib.CocoFolderSource(coco_root, 4)
  assert boxes_only.num_examples('train', training=True) == 3
  assert 'example' not in next(iter(boxes_only.share('train', 0, 1, training=True).elements(
      None, 0)))[1]


def test_training_batches_carry_the_crops_flipped_with_the_boxes(coco_root):
  data = data_lib.DetectionData(_config(coco_root), _mask_fields())
  assert data.info.num_train_examples == 2
  expected = _expected_crops()
  # Image 1, 40 × 60 -> 64 × 96 (scale 1.6); image 2, 48 × 48 -> 64 × 64 (scale 4 / 3).
  scale = {1: 1.6, 2: 4 / 3}
  width = {1: 96, 2: 64}
  flips = set()
  batches = [b for b, _ in zip(data.local_train_batches(0, 1), range(6))]
  resumed = next(data.local_train_batches(0, 1, start_step=3))
  for key, value in batches[3].items():
    np.testing.assert_array_equal(resumed[key], value, err_msg=key)
  for batch in batches:
    image_id = int(np.round(((batch['image'][0, 0, 0, 0] * STD[0] + MEAN[0]) * 255 - 10) / 3))
    crops, boxes = batch['gt_mask_crops'][0], batch['boxes'][0]
    count = len(expected[image_id])
    assert crops.shape == (4, CROP, CROP) and crops.dtype == np.uint8
    assert not crops[count:].any()
    first = TRAIN_ANNOTATIONS[0 if image_id == 1 else 3]['bbox']
    flipped = not np.isclose(boxes[0, 0], first[0] * scale[image_id])
    if flipped:
      np.testing.assert_allclose(boxes[0, 2], width[image_id] - first[0] * scale[image_id],
                                 rtol=1e-5)
    np.testing.assert_array_equal(crops[:count],
                                  expected[image_id][:, :, ::-1] if flipped else expected[image_id])
    flips.add(flipped)
  assert flips == {True, False}
  boxes_only = next(data_lib.DetectionData(_config(coco_root)).local_train_batches(0, 1))
  assert 'gt_mask_crops' not in boxes_only


def test_streams_with_masks_are_closed_at_exit(coco_root):
  """A tf.data iterator destroyed as the interpreter finalizes waits for its tf.numpy_function
  calls in flight, which can no longer take the GIL (a process holding a stream with masks hung
  at exit): the streams are closed by an atexit hook while Python still runs."""
  data = data_lib.DetectionData(_config(coco_root), _mask_fields())
  stream = data.local_train_batches(0, 1)
  assert next(stream)['gt_mask_crops'].shape == (1, 4, CROP, CROP)
  data_lib._close_python_streams()  # pylint: disable=protected-access
  with pytest.raises(StopIteration):
    next(stream)
  boxes_only = data_lib.DetectionData(_config(coco_root)).local_train_batches(0, 1)
  next(boxes_only)
  data_lib._close_python_streams()  # pylint: disable=protected-access
  assert 'boxes' in next(boxes_only)  # Without Python in its pipeline, left open.


def test_each_bad_input_is_one_line_naming_it(tmp_path):
  def error_of(annotations=None, **kwargs):
    """The error of a folder with `annotations` for training, its path written ROOT."""
    root = _write_folder(str(tmp_path / f'case{len(os.listdir(tmp_path))}'), annotations,
                         **kwargs)
    with pytest.raises((ValueError, FileNotFoundError)) as error:
      data_lib.DetectionData(_config(root), _mask_fields())
    return str(error.value).replace(root, 'ROOT')

  def changed(index, **fields):
    annotations = copy.deepcopy(TRAIN_ANNOTATIONS)
    annotations[index].update(fields)
    return annotations

  file = 'ROOT/annotations/instances_train2017.json'
  first, second = (f'{file}: annotation {number} of image 1 (000000000001.png)'
                   for number in (101, 102))
  ring_image = f'{file}: annotation 104 of image 2 (000000000002.png)'
  rle = _uncompressed_rle(_rectangles(40, 60, *L_SHAPE))
  ring = _compressed_rle(_ring(48, 48))
  cases = [
      (changed(0, segmentation=[[10, 5, 20, 5, 20]]), f'{first} does not decode: its polygon has '
       'a part that is not an even count of finite numbers'),
      (changed(0, segmentation=[[10, 5, 'x', 5, 20, 15]]), f'{first} does not decode: its '
       'polygon has a part that is not a list of numbers'),
      (changed(0, segmentation=[[10, 5, 20, 5]]), f'{first} does not decode: its polygon has no '
       'part of 3 or more points'),
      (changed(0, segmentation={'counts': [2400]}), f'{first} does not decode: its segmentation '
       'is neither a polygon (list) nor an RLE (dict with size and counts)'),
      (changed(1, segmentation={**rle, 'counts': rle['counts'][:-1]}), f'{second} does not '
       f'decode: its RLE run lengths sum to {2400 - rle["counts"][-1]} (or are negative), not '
       'height × width = 2400'),
      (changed(1, segmentation={**rle, 'size': [60, 40]}), f'{second} does not decode: its RLE '
       'size is [60, 40], the image is [40, 60]'),
      (changed(3, segmentation={**ring, 'counts': ring['counts'][:-3] + '~'}), f'{ring_image} '
       "does not decode: its RLE string has a character outside pycocotools' encoding ('~')"),
      (changed(3, segmentation={**ring, 'counts': ring['counts'] + 'a'}), f'{ring_image} does '
       'not decode: its RLE string ends inside a run length'),
      (changed(1, category_id=9), f"{second} has category id 9, which is not in the file's "
       'categories'),
      (changed(1, bbox=[61, 20, 15, 15]), f'{second} has its box [61, 20, 15, 15] (x, y, width, '
       'height) wholly outside the 60 × 40 image'),
  ]
  for annotations, expected in cases:
    assert error_of(annotations) == expected
  assert error_of(skip_files=(2,)) == (
      f'ROOT/train2017/000000000002.png (image id 2, listed in {file}) does not exist')
  # A crowd's segmentation is never decoded (no mask target), so a broken one is no error.
  root = _write_folder(str(tmp_path / 'crowd'), changed(2, segmentation={'counts': 'broken~'}))
  assert data_lib.DetectionData(_config(root), _mask_fields()).info.num_train_examples == 2
  # A polygon's parts under 3 points enclose nothing and are left out.
  polygon = [[4, 4, 14, 4, 14, 14, 4, 14], [1, 1, 2, 2]]
  assert instance_masks.check_segmentation(polygon, 40, 40) is None
  np.testing.assert_array_equal(instance_masks.decode_segmentation(polygon, 40, 40),
                                _rectangles(40, 40, (4, 4, 14, 14)))


def test_tfds_has_no_instance_masks():
  config = _config(None, dataset='coco/2017')
  with pytest.raises(ValueError) as error:
    data_lib.DetectionData(config, _mask_fields())
  assert str(error.value) == (
      "config.dataset='coco/2017': TFDS detection datasets have no instance masks; instance "
      "segmentation reads the COCO folder: config.dataset='coco' with config.data_dir = ROOT of "
      'annotations/instances_{train,val}2017.json, train2017/, val2017/')
  with pytest.raises(ValueError, match=r"asks for training batch fields \['masks'\] that the "
                     'detection data does not make'):
    data_lib.DetectionData(config, {'masks': _mask_fields()['gt_mask_crops']})


def test_recropping_a_crop_over_part_of_its_box_samples_that_part():
  # Ink edges on even pixels and 2 pixels per bin: both crops sample the bitmap exactly.
  bitmap = _rectangles(40, 40, (4, 6, 12, 30), (12, 20, 26, 30))
  box, part = (0, 0, 32, 32), (8, 4, 24, 20)
  crop = masks_lib.crop_masks_to_boxes(bitmap[None], np.float32([box]), CROP)
  recropped = data_lib.recrop_masks(tf.constant(crop), tf.constant([box], tf.float32),
                                    tf.constant([part], tf.float32)).numpy()
  np.testing.assert_array_equal(recropped, masks_lib.crop_masks_to_boxes(
      bitmap[None], np.float32([part]), CROP))
  np.testing.assert_array_equal(data_lib.recrop_masks(
      tf.constant(crop), tf.constant([box], tf.float32), tf.constant([box], tf.float32)), crop)


def test_multiscale_training_and_random_crops_keep_crops_on_their_boxes():
  """DENSE.md's 3x policies on an image whose pixels are its instances' ink: whatever the scale,
  crop and flip, each crop matches the ink of the transformed image over its transformed box."""
  ink = [_rectangles(100, 80, (10, 10, 40, 30), (10, 30, 20, 70)),
         _rectangles(100, 80, (45, 50, 75, 95), (60, 40, 70, 50))]
  boxes = np.float32([[10, 10, 40, 70], [45, 40, 75, 95]])
  features = {'image': tf.constant(np.repeat((ink[0] | ink[1])[..., None] * 255, 3, -1)
                                   .astype(np.uint8)),
              'boxes': tf.constant(boxes), 'labels': tf.constant([0, 1]),
              'crowd': tf.constant([False, False]),
              'mask_crops': tf.constant(masks_lib.crop_masks_to_boxes(np.stack(ink), boxes, CROP))}
  transform = data_lib.Transform((160, 160), (160, 96), hflip=True, max_boxes=3,
                                 short_sides=(64, 80, 96), crop_short_sides=(60, 70),
                                 crop_size=(40, 56))
  train = tf.function(transform.train)
  sizes = set()
  for seed in range(12):
    out = {k: v.numpy() for k, v in train(features, tf.constant([seed, 1], tf.int64)).items()}
    height, width = out['image_size']
    sizes.add((int(height), int(width)))
    assert min(height, width) in (64, 80, 96) or max(height, width) == 160
    bright = out['image'][:height, :width, 0] > 0  # Normalized: ink is bright, the rest dark.
    count = int(out['box_mask'].sum())
    assert not out['gt_mask_crops'][count:].any()
    for crop, box in zip(out['gt_mask_crops'][:count], out['boxes'][:count]):
      seen = masks_lib.crop_masks_to_boxes(bright[None], box[None], CROP)[0]
      # Bins along the ink's outline may differ (the image and the crop are resampled apart).
      assert np.mean(seen == crop) > 0.9, (seed, box)
  # Policy (a) keeps the aspect ratio (100 × 80); policy (b)'s crops change it.
  assert any(round(h / w, 2) == 1.25 for h, w in sizes)
  assert any(round(h / w, 2) != 1.25 for h, w in sizes)
