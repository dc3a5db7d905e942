"""Tests of the detection data and evaluation: the COCO folder read with pycocotools, TFDS, the
digit scenes written in the COCO layout, mmdet's transforms, exact resumption, and a COCOeval
round trip on a hand-made set."""

import importlib
import json
import os

import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from secvit_jax.data import detection as data_lib
from secvit_jax.data import ops
from secvit_jax.evaluation import coco
from secvit_jax.tasks import detection as task_lib

import tensorflow as tf  # pylint: disable=g-bad-import-order
import tensorflow_datasets as tfds  # pylint: disable=g-bad-import-order

MEAN, STD = np.array(ops.IMAGENET_MEAN), np.array(ops.IMAGENET_STD)
# Categories listed out of id order, with gaps: labels 0, 1, 2 are ids 3, 7, 12.
CATEGORIES = [{'id': 12, 'name': 'bird'}, {'id': 3, 'name': 'cat'}, {'id': 7, 'name': 'dog'}]


def _image(image_id: int, height: int, width: int) -> np.ndarray:
  """A constant image whose value encodes its id (10 + 3 × id)."""
  return np.full((height, width, 3), 10 + 3 * image_id, np.uint8)


def _write_split(root, folder, images, annotations):
  os.makedirs(os.path.join(root, folder), exist_ok=True)
  os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
  for image in images:
    Image.fromarray(_image(image['id'], image['height'], image['width'])).save(
        os.path.join(root, folder, image['file_name']))
  for number, ann in enumerate(annotations, 1):
    ann.setdefault('iscrowd', 0)
    ann.setdefault('area', ann['bbox'][2] * ann['bbox'][3])
    ann['id'] = number
  with open(os.path.join(root, 'annotations', f'instances_{folder}.json'), 'w') as f:
    json.dump({'images': images, 'annotations': annotations, 'categories': CATEGORIES}, f)


@pytest.fixture(scope='module')
def coco_root(tmp_path_factory):
  """A hand-made COCO folder.

  train2017: image 5 (40 × 60) with a dog, a crowd of cats and a box too thin; image 9 without
  boxes and image 2 (20 × 100) too small: neither trained on; image 11 (64 × 48) with a bird and
  a cat. val2017: images 21 (30 × 50), 22 (50 × 30), 23 (40 × 40).
  """
  root = str(tmp_path_factory.mktemp('coco'))
  image = lambda i, h, w: {'id': i, 'file_name': f'{i:012d}.png', 'height': h, 'width': w}
  _write_split(root, 'train2017', [image(5, 40, 60), image(9, 50, 50), image(2, 20, 100),
                                   image(11, 64, 48)], [
      {'image_id': 5, 'category_id': 7, 'bbox': [10, 5, 20, 10]},
      {'image_id': 5, 'category_id': 3, 'bbox': [0, 0, 30, 30], 'iscrowd': 1},
      {'image_id': 5, 'category_id': 3, 'bbox': [40, 5, 0.5, 10]},
      {'image_id': 2, 'category_id': 3, 'bbox': [1, 1, 10, 10]},
      {'image_id': 11, 'category_id': 12, 'bbox': [4, 6, 20, 30]},
      {'image_id': 11, 'category_id': 3, 'bbox': [30, 40, 15, 20]}])
  _write_split(root, 'val2017', [image(21, 30, 50), image(22, 50, 30), image(23, 40, 40)], [
      {'image_id': 21, 'category_id': 7, 'bbox': [5, 5, 20, 15]},
      {'image_id': 21, 'category_id': 12, 'bbox': [30, 2, 15, 25]},
      {'image_id': 22, 'category_id': 3, 'bbox': [2, 10, 25, 30]},
      {'image_id': 23, 'category_id': 12, 'bbox': [10.5, 10.25, 12, 14]}])
  return root


def make_config(data_dir, **fields):
  config = importlib.import_module('configs.det_demo').get_config()
  config.dataset = 'coco'
  config.data_dir = data_dir
  config.input.canvas_size = (96, 128)
  config.input.max_size = (120, 80)
  config.input.hflip = True
  config.max_boxes = 4
  config.batch_size = 2
  config.eval_batch_size = 2
  config.update(fields)
  return config


def image_ids_of(batch):
  """Ids of the constant test images of a batch, read back from their pixels."""
  values = (batch['image'][:, 0, 0, 0] * STD[0] + MEAN[0]) * 255
  return np.round((values - 10) / 3).astype(int).tolist()


# ------------------------------------------------------------------------------------------------
# The COCO folder.
# ------------------------------------------------------------------------------------------------


def test_coco_folder_labels_annotations_and_training_images(coco_root):
  data = data_lib.DetectionData(make_config(coco_root))
  assert data.info.class_names == ('cat', 'dog', 'bird')
  assert data.category_ids == (3, 7, 12)
  assert (data.info.num_classes, data.info.num_train_examples, data.info.num_eval_examples) == (
      3, 2, 3)
  source = data_lib.CocoFolderSource(coco_root, 4)
  share = source.share('train', 0, 1, training=True)
  examples = [features for _, features in share.elements(None, 0).as_numpy_iterator()]
  assert [int(e['image_id']) for e in examples] == [5, 11]
  np.testing.assert_array_equal(examples[0]['boxes'], [[10, 5, 30, 15], [0, 0, 30, 30]])
  np.testing.assert_array_equal(examples[0]['labels'], [1, 0])
  np.testing.assert_array_equal(examples[0]['crowd'], [False, True])
  np.testing.assert_array_equal(examples[1]['labels'], [2, 0])
  assert source.num_examples('train') == 4  # Evaluating would use every image.


def test_coco_folder_errors_name_what_is_wrong(coco_root, tmp_path):
  with pytest.raises(ValueError, match="config.dataset='coco' needs config.data_dir"):
    data_lib.DetectionData(make_config(None))
  with pytest.raises(FileNotFoundError, match=f'{tmp_path}/annotations/instances_train2017.json '
                     'does not exist; a COCO dataset is ROOT/annotations'):
    data_lib.DetectionData(make_config(str(tmp_path)))
  with pytest.raises(ValueError, match=r'000000000005.png \(image id 5\) of train has 2 boxes, '
                     'more than config.max_boxes=1'):
    data_lib.DetectionData(make_config(coco_root, max_boxes=1))
  with pytest.raises(ValueError, match="a COCO folder has splits 'train' and 'val', got 'test'"):
    data_lib.DetectionData(make_config(coco_root, eval_split='test'))


def test_training_transform_resizes_flips_pads_and_moves_the_boxes(coco_root):
  config = make_config(coco_root)
  data = data_lib.DetectionData(config)
  transform = data_lib.Transform.from_config(config, encoded=False)
  boxes = tf.constant([[10., 5., 30., 15.], [0., 0., 60., 40.]])
  features = {'image': tf.constant(_image(5, 40, 60)), 'boxes': boxes,
              'labels': tf.constant([1, 0]), 'crowd': tf.constant([False, True])}
  flips = {}
  for number in range(8):
    seed = tf.constant([number, 0], tf.int64)
    flipped = bool(tf.random.stateless_uniform([], seed) < 0.5)
    flips[flipped] = {k: v.numpy() for k, v in transform.train(features, seed).items()}
  assert set(flips) == {True, False}
  for flipped, out in flips.items():
    # 40 × 60 to fit (120, 80): scale min(120 / 60, 80 / 40) = 2 -> 80 × 120.
    np.testing.assert_array_equal(out['image_size'], [80, 120])
    assert out['image'].shape == (96, 128, 3)
    assert not out['image'][80:].any() and not out['image'][:, 120:].any()
    assert image_ids_of({'image': out['image'][None]}) == [5]
    expected = [[20, 10, 60, 30], [0, 0, 120, 80]]
    if flipped:
      expected = [[60, 10, 100, 30], [0, 0, 120, 80]]
    np.testing.assert_allclose(out['boxes'][:2], expected)
    assert not out['boxes'][2:].any()
    np.testing.assert_array_equal(out['box_mask'], [True, True, False, False])
    np.testing.assert_array_equal(out['crowd'], [False, True, False, False])
    np.testing.assert_array_equal(out['labels'], [1, 0, 0, 0])
  del data


def test_a_large_image_is_bounded_by_the_canvas():
  config = make_config(None)
  config.input.max_size = (1333, 800)
  sizes = [tuple(data_lib.resized_size(h, w, (1333, 800), canvas).numpy())
           for h, w, canvas in [(480, 640, (1344, 1344)), (640, 427, (1344, 1344)),
                                (500, 2000, (1344, 1344)), (640, 427, (800, 1344))]]
  # mmcv: 480 × 640 -> scale 800 / 480; 640 × 427 -> 1199 × 800; 500 × 2000 -> 333 × 1333.
  assert sizes == [(800, 1067), (1199, 800), (333, 1333), (800, 534)]


def test_training_batches_resume_exactly_and_flip_by_seed(coco_root):
  config = make_config(coco_root, batch_size=1)
  data = data_lib.DetectionData(config)
  stream = data.local_train_batches(0, 1)
  first = [next(stream) for _ in range(6)]
  assert sorted(image_ids_of(first[0]) + image_ids_of(first[1])) == [5, 11]  # One epoch.
  for start in (3, 4):
    resumed = next(data.local_train_batches(0, 1, start_step=start))
    for key in first[start]:
      np.testing.assert_array_equal(resumed[key], first[start][key], err_msg=key)
  other_seed = data_lib.DetectionData(make_config(coco_root, batch_size=1, seed=1))
  orders = [image_ids_of(b) for b in first], [image_ids_of(next(s)) for s in [
      other_seed.local_train_batches(0, 1)] * 6]
  assert orders[0] != orders[1]


def test_eval_batches_cover_every_image_once_with_their_ids_and_sizes(coco_root):
  data = data_lib.DetectionData(make_config(coco_root))
  seen = {}
  for process in range(2):
    for batch in data.local_eval_batches(process, 2):
      assert set(batch) == {'image', 'image_size', 'image_id', 'original_size', 'mask'}
      for i in np.flatnonzero(batch['mask']):
        seen[int(batch['image_id'][i])] = (tuple(batch['original_size'][i]),
                                           tuple(batch['image_size'][i]))
        assert image_ids_of({'image': batch['image'][i:i + 1]}) == [batch['image_id'][i]]
  # To fit (120, 80) and the 96 × 128 canvas: 30 × 50 -> scale 2.4 (72 × 120); 50 × 30 -> 1.92
  # (the canvas' height: 96 × 57.6, rounded to 58); 40 × 40 -> 2 (80 × 80).
  assert seen == {21: ((30, 50), (72, 120)), 22: ((50, 30), (96, 58)), 23: ((40, 40), (80, 80))}


# ------------------------------------------------------------------------------------------------
# COCOeval.
# ------------------------------------------------------------------------------------------------


def _detections_from_ground_truth(coco_root, data, labels_shift=0):
  """eval_outputs-like outputs of every eval batch: the ground truth itself, mapped onto the
  canvas and back, with the labels shifted by `labels_shift`."""
  ground_truth = data_lib.load_coco(os.path.join(coco_root, 'annotations',
                                                 'instances_val2017.json'))
  label_of = {category: label for label, category in enumerate(data.category_ids)}
  outputs = []
  for batch in data.local_eval_batches(0, 1):
    boxes, labels, kept = np.zeros((2, 5, 4)), np.zeros((2, 5), np.int32), np.zeros((2, 5), bool)
    for i in np.flatnonzero(batch['mask']):
      scale = batch['image_size'][i] / batch['original_size'][i]
      for j, ann in enumerate(ground_truth.imgToAnns[int(batch['image_id'][i])]):
        x, y, w, h = ann['bbox']
        boxes[i, j] = np.array([x, y, x + w, y + h]) * np.tile(scale[::-1], 2)  # On the canvas.
        labels[i, j] = (label_of[ann['category_id']] + labels_shift) % 3
        kept[i, j] = True
    outputs.append({
        'boxes': task_lib.to_original_pixels(jnp.asarray(boxes, jnp.float32),
                                             jnp.asarray(batch['image_size']),
                                             jnp.asarray(batch['original_size'])),
        'scores': jnp.where(kept, 0.9, 0.0), 'labels': jnp.asarray(labels),
        'kept': jnp.asarray(kept), 'image_id': jnp.asarray(batch['image_id'])})
  return outputs


def test_coco_round_trip_perfect_detections_score_one(coco_root, tmp_path):
  config = make_config(coco_root)
  data = data_lib.DetectionData(config)
  ground_truth, category_ids = data_lib.evaluation_reference(config)
  assert category_ids == (3, 7, 12)
  path = tmp_path / 'predictions' / 'eval_step_7.json'
  evaluator = coco.CocoEvaluator(ground_truth, category_ids, predictions_path=path,
                                     fetch_every=1)
  for outputs in _detections_from_ground_truth(coco_root, data):
    evaluator.add(outputs)
  results = evaluator.result()
  assert list(results) == list(coco.METRICS)
  for name in ('AP', 'AP50', 'AP75', 'AR1', 'AR10', 'AR100'):
    assert results[name] == pytest.approx(1.0), name
  written = json.loads(path.read_text())
  assert sorted((d['image_id'], d['category_id']) for d in written) == [
      (21, 7), (21, 12), (22, 3), (23, 12)]
  [box] = [d['bbox'] for d in written if d['image_id'] == 23]
  np.testing.assert_allclose(box, [10.5, 10.25, 12, 14], atol=0.01)
  assert not [name for name in os.listdir(path.parent) if name != path.name]

  wrong = coco.CocoEvaluator(ground_truth, category_ids)
  for outputs in _detections_from_ground_truth(coco_root, data, labels_shift=1):
    wrong.add(outputs)
  assert wrong.result()['AP'] == 0.0
  nothing = coco.coco_metrics(ground_truth, [])
  assert nothing['AP'] == 0.0 and nothing['AR100'] == 0.0


# ------------------------------------------------------------------------------------------------
# Digit scenes through the COCO reader.
# ------------------------------------------------------------------------------------------------


SCENES = {'seed': 3, 'num_train': 6, 'num_val': 3, 'height': 48, 'width': 64, 'digits': (1, 3),
          'digit_sizes': (12, 24), 'image_format': 'png'}


def test_the_demo_data_reads_its_scenes_through_the_coco_reader(tmp_path):
  config = make_config(str(tmp_path / 'demo'), dataset='digit_scenes', max_boxes=3)
  config.digit_scenes.update(SCENES)
  config.input.canvas_size = (48, 64)
  config.input.max_size = (64, 48)
  data = data_lib.DetectionData(config)
  assert data.info.class_names == tuple(str(d) for d in range(10))
  assert (data.info.num_train_examples, data.info.num_eval_examples) == (6, 3)
  batch = next(data.local_train_batches(0, 1))
  assert batch['image'].shape == (2, 48, 64, 3) and batch['box_mask'].any(axis=1).all()


# ------------------------------------------------------------------------------------------------
# TFDS.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  """A tiny TFDS dataset with COCO's detection features: 3 training and 2 validation images."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
      'image/id': np.int64,
      'objects': tfds.features.Sequence({
          'bbox': tfds.features.BBoxFeature(), 'label': tfds.features.ClassLabel(names=['a', 'b']),
          'is_crowd': np.bool_, 'area': np.int64})})

  def example(image_id, height, width, boxes):
    return (image_id, {
        'image': _image(image_id, height, width), 'image/id': image_id,
        'objects': {'bbox': [tfds.features.BBox(*map(float, b[:4])) for b in boxes],
                    'label': [b[4] for b in boxes], 'is_crowd': [b[5] for b in boxes],
                    'area': [b[6] for b in boxes]}})

  tfds.dataset_builders.store_as_tfds_dataset(
      name='secvit_test_detection', version='1.0.0', features=features, data_dir=data_dir,
      split_datasets={
          'train': [example(1, 40, 60, [(0.25, 0.5, 0.75, 1.0, 1, False, 300)]),
                    example(2, 40, 40, []), example(3, 20, 40, [(0, 0, 1, 1, 0, True, 800)])],
          'validation': [example(4, 40, 80, [(0.5, 0.25, 1.0, 0.5, 0, False, 150)]),
                         example(6, 50, 20, [])]})
  return data_dir


def test_tfds_detection_data_and_its_ground_truth(tfds_dir):
  config = make_config(tfds_dir, dataset='secvit_test_detection')
  data = data_lib.DetectionData(config)
  assert data.info.class_names == ('a', 'b') and data.category_ids == (1, 2)
  assert (data.info.num_train_examples, data.info.num_eval_examples) == (3, 2)
  share = data_lib.TfdsDetectionSource('secvit_test_detection', tfds_dir, 10).share(
      'train', 0, 1)
  examples = {int(f['image_id']): f for _, f in share.elements(None, 0).as_numpy_iterator()}
  # Normalized (ymin, xmin, ymax, xmax) -> pixel (x0, y0, x1, y1).
  np.testing.assert_allclose(examples[1]['boxes'], [[30, 10, 60, 30]])
  assert examples[2]['boxes'].shape == (0, 4)
  ground_truth, category_ids = data_lib.evaluation_reference(config)
  assert category_ids == (1, 2) and sorted(ground_truth.imgs) == [4, 6]
  assert ground_truth.imgs[4]['height'] == 40 and ground_truth.imgs[4]['width'] == 80
  [ann] = ground_truth.anns.values()
  assert ann['category_id'] == 1 and ann['area'] == 150
  np.testing.assert_allclose(ann['bbox'], [20, 20, 20, 20])
  eval_ids = sorted(i for b in data.local_eval_batches(0, 1)
                    for i, m in zip(b['image_id'], b['mask']) if m)
  assert eval_ids == [4, 6]
