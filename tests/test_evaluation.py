"""COCO evaluation of boxes and masks (`evaluation.coco`): detections with m × m mask probabilities
over their boxes, pasted into the original images, against a hand-made ground truth; and
secvit-predict's pictures and listing of masks."""

import json

import numpy as np
from PIL import Image
from pycocotools import coco as coco_api
from pycocotools import mask as mask_api
import pytest

from secvit_jax.detection import masks as masks_lib
from secvit_jax.evaluation import coco

MASK = 28  # The side of the detections' masks, as Mask R-CNN's.
# Per image (height, width): instances (category id, box x, y, side), each box a whole number of
# mask bins (side 28 or 56) so that pasting a mask of the instance's bins gives it back exactly.
IMAGES = {1: ((40, 50), [(1, 5, 6, 28), (2, 20, 10, 28)]),
          2: ((70, 60), [(3, 2, 4, 56)]),
          3: ((30, 30), [(2, 1, 1, 28)])}


def _instances():
  """Image id -> [(category id, box (x0, y0, x1, y1), bins uint8 (28, 28), bitmap bool (H, W))]:
  random bins, each bin spanning side / 28 pixels of its box."""
  rng = np.random.default_rng(0)
  instances = {}
  for image_id, ((height, width), objects) in IMAGES.items():
    instances[image_id] = []
    for category, x, y, side in objects:
      bins = (rng.random((MASK, MASK)) < 0.6).astype(np.uint8)
      bitmap = np.zeros((height, width), bool)
      factor = side // MASK
      bitmap[y:y + side, x:x + side] = np.kron(bins, np.ones((factor, factor), np.uint8))
      instances[image_id].append((category, (x, y, x + side, y + side), bins, bitmap))
  return instances


@pytest.fixture(scope='module')
def ground_truth():
  images, annotations = [], []
  for image_id, ((height, width), _) in IMAGES.items():
    images.append({'id': image_id, 'height': height, 'width': width})
    for category, (x0, y0, x1, y1), _, bitmap in _instances()[image_id]:
      annotations.append({'id': len(annotations) + 1, 'image_id': image_id,
                          'category_id': category, 'iscrowd': 0, 'area': float(bitmap.sum()),
                          'bbox': [x0, y0, x1 - x0, y1 - y0],
                          'segmentation': coco.encode_mask(bitmap)})
  return coco.coco_from_dict({'images': images, 'annotations': annotations,
                              'categories': [{'id': i, 'name': str(i)} for i in (1, 2, 3)]})


def _outputs(shift_labels=0, spoil_masks=False, slots=4):
  """One batch per image of its ground truth as detections (labels = category id - 1, boxes in
  the image's pixels, the masks its bins as probabilities), in `slots` padded slots."""
  batches = []
  for image_id, ((height, width), _) in IMAGES.items():
    boxes = np.zeros((1, slots, 4), np.float32)
    masks = np.zeros((1, slots, MASK, MASK), np.float32)
    labels = np.zeros((1, slots), np.int32)
    kept = np.zeros((1, slots), bool)
    for i, (category, box, bins, _) in enumerate(_instances()[image_id]):
      boxes[0, i] = box
      masks[0, i] = np.where(bins, 0.9, 0.1)
      if spoil_masks:
        masks[0, i, :MASK // 2] = 1 - masks[0, i, :MASK // 2]
      labels[0, i] = (category - 1 + shift_labels) % 3
      kept[0, i] = True
    batches.append({'boxes': boxes, 'scores': np.where(kept, 0.9, 0.0), 'labels': labels,
                    'kept': kept, 'image_id': np.array([image_id]), 'masks': masks,
                    'original_size': np.array([[height, width]])})
  return batches


def _evaluate(ground_truth, iou_types, outputs, **kwargs):
  evaluator = coco.CocoEvaluator(ground_truth, (1, 2, 3), iou_types=iou_types, fetch_every=2,
                                 **kwargs)
  for batch in outputs:
    evaluator.add(batch)
  return evaluator.result()


def test_perfect_masks_pasted_from_their_bins_score_one(ground_truth, tmp_path):
  path = tmp_path / 'predictions.json'
  results = _evaluate(ground_truth, ('bbox', 'segm'), _outputs(), predictions_path=path)
  assert list(results) == list(coco.METRICS) + [f'segm_{name}' for name in coco.METRICS]
  for name in ('AP', 'AP50', 'AR100', 'segm_AP', 'segm_AP50', 'segm_AP75', 'segm_AR100'):
    assert results[name] == pytest.approx(1.0), name

  # The written results are COCO's format, RLE counts as str, and load back with pycocotools.
  loaded = ground_truth.loadRes(str(path))
  assert isinstance(loaded, coco_api.COCO) and len(loaded.anns) == len(ground_truth.anns)
  for detection in loaded.anns.values():
    assert isinstance(detection['segmentation']['counts'], str)
    image = ground_truth.imgs[detection['image_id']]
    assert detection['segmentation']['size'] == [image['height'], image['width']]
    truth = [ann for ann in ground_truth.imgToAnns[detection['image_id']]
             if ann['bbox'] == detection['bbox']]
    assert truth and truth[0]['segmentation'] == detection['segmentation']


def test_masks_pasted_over_their_windows_encode_as_pasted_over_the_image():
  rng = np.random.default_rng(1)
  corners = rng.uniform(-15, 60, (40, 2))
  boxes = np.concatenate([corners, corners + rng.uniform(0.3, 40, (40, 2))], axis=1)
  boxes[0] = (10, 10, 10, 30)  # Empty.
  boxes[3] = (30, 20, 25, 10)  # Inverted.
  boxes[1] = (-5, -5, 80, 70)  # Beyond the image on every side.
  boxes[2] = (50, 0, 64, 50)  # Full height, runs across columns, ending with the image.
  probs = rng.random((40, MASK, MASK)).astype(np.float32)
  pasted = masks_lib.paste_masks(probs, boxes, 50, 64)
  assert pasted[1:].any(axis=(1, 2)).sum() > 20
  assert coco.encode_pasted_masks(probs, boxes, 50, 64) == [coco.encode_mask(m) for m in pasted]


def test_wrong_masks_and_classes_score_lower(ground_truth):
  spoiled = _evaluate(ground_truth, ('bbox', 'segm'), _outputs(spoil_masks=True))
  assert spoiled['AP'] == pytest.approx(1.0)  # The boxes are still right.
  assert spoiled['segm_AP'] < 0.5

  wrong = _evaluate(ground_truth, ('segm',), _outputs(shift_labels=1))
  assert list(wrong) == [f'segm_{name}' for name in coco.METRICS]
  assert wrong['segm_AP'] == 0.0
  assert coco.coco_metrics(ground_truth, [], 'segm')['segm_AP'] == 0.0
  with pytest.raises(ValueError, match=r"iou_types must be some of \('bbox', 'segm'\)"):
    coco.CocoEvaluator(ground_truth, (1, 2, 3), iou_types=('keypoints',))


# ------------------------------------------------------------------------------------------------
# secvit-predict's outputs with masks.
# ------------------------------------------------------------------------------------------------


def test_predict_draws_and_lists_each_instance_with_its_mask(monkeypatch, tmp_path):
  from secvit_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from secvit_jax.tasks import detection as task_lib  # pylint: disable=g-import-not-at-top
  image = np.full((40, 50, 3), 100, np.uint8)
  bins = np.zeros((MASK, MASK), np.float32)
  bins[7:21, 7:21] = 0.9  # The middle half of the box.
  # Made-up outputs of `detect_images`: two instances with masks, the third under min_score.
  found = {'boxes': np.array([[4, 4, 32, 32], [30, 10, 44, 38], [0, 0, 10, 10]], np.float32),
           'scores': np.array([0.9, 0.8, 0.1], np.float32),
           'labels': np.array([1, 1, 0], np.int32),
           'masks': np.stack([bins, np.full((MASK, MASK), 0.8, np.float32), bins])}
  monkeypatch.setattr(task_lib, 'detect_images', lambda *args, **kwargs: [found])
  monkeypatch.setattr(task_lib, 'detector_of', lambda task_settings: None)
  info = checkpoints.ModelInfo(
      variant='secvit_t', num_classes=2, task='detection', class_names=('cat', 'dog'),
      task_settings={'canvas_size': [64, 64], 'max_size': [64, 64]})
  options = type('Options', (), {'images': ['scene.png'], 'min_score': 0.3, 'batch_size': 1,
                                 'output_dir': str(tmp_path)})
  result, = task_lib.DetectionTask.predict(None, None, info, [image], options)

  listed = json.loads(json.dumps(result['detections']))  # --json prints them as they are.
  assert [(d['name'], d['score']) for d in listed] == [('dog', pytest.approx(0.9)),
                                                       ('dog', pytest.approx(0.8))]
  first = mask_api.decode({**listed[0]['mask'], 'counts': listed[0]['mask']['counts'].encode()})
  assert first.shape == (40, 50)
  np.testing.assert_array_equal(np.argwhere(first)[[0, -1]], [[11, 11], [24, 24]])
  assert mask_api.area({**listed[1]['mask'], 'counts': listed[1]['mask']['counts'].encode()}) == (
      14 * 28)
  text = task_lib.DetectionTask.show('scene.png', result, options)
  assert '   0.90  dog  (4.0, 4.0, 32.0, 32.0)  196 px' in text.splitlines()
  assert '   0.80  dog  (30.0, 10.0, 44.0, 38.0)  392 px' in text.splitlines()

  picture = np.asarray(Image.open(result['picture']))
  colours = [task_lib.class_colour(rank) for rank in (0, 1)]  # An instance's own colour.
  assert colours[0] != colours[1]
  # Mask outlines (the labels cover the boxes' top-left corners), and a half-transparent fill.
  np.testing.assert_array_equal(picture[24, 20], colours[0])
  np.testing.assert_array_equal(picture[20, 24], colours[0])
  np.testing.assert_array_equal(picture[30, 43], colours[1])
  np.testing.assert_array_equal(picture[20, 20], np.round((100 + np.array(colours[0])) / 2))
  np.testing.assert_array_equal(picture[28, 8], [100, 100, 100])  # Inside the box, not the mask.
  np.testing.assert_array_equal(picture[2, 2], [100, 100, 100])  # Below min_score: not drawn.
  np.testing.assert_array_equal(picture[20, 4], colours[0])  # Its box.
