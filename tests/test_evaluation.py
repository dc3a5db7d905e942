"""COCO evaluation of boxes and masks (`evaluation.coco`): detections with m × m mask probabilities
over their boxes, pasted into the original images, against a hand-made ground truth."""

import numpy as np
from pycocotools import coco as coco_api
import pytest

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
