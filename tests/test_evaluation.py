"""COCO evaluation of boxes and masks (`evaluation.coco`) on digit scenes' ground truth."""

import json

import numpy as np
from pycocotools import mask as mask_api
import pytest

from secvit_jax.data import digit_scenes
from secvit_jax.evaluation import coco

SETTINGS = {'seed': 5, 'num_train': 1, 'num_val': 3, 'height': (30, 36), 'width': (30, 40),
            'digits': (2, 3), 'digit_sizes': (10, 14), 'image_format': 'png'}


@pytest.fixture(scope='module')
def ground_truth(tmp_path_factory):
  root = digit_scenes.write_scenes(str(tmp_path_factory.mktemp('scenes') / 'digits'), SETTINGS)
  with open(f'{root}/annotations/instances_validation.json') as f:
    return coco.coco_from_dict(json.load(f))


def _outputs(ground_truth, shift_labels=0, padding=3):
  """One batch per image of its ground truth as detections: boxes and masks on a canvas
  `padding` pixels larger than the image."""
  batches = []
  for image_id, image in sorted(ground_truth.imgs.items()):
    anns = ground_truth.imgToAnns[image_id]
    height, width = image['height'], image['width']
    boxes = np.zeros((1, 4, 4), np.float32)
    masks = np.zeros((1, 4, height + padding, width + padding), bool)
    labels = np.zeros((1, 4), np.int32)
    kept = np.zeros((1, 4), bool)
    for i, ann in enumerate(anns):
      x, y, w, h = ann['bbox']
      boxes[0, i] = (x, y, x + w, y + h)
      masks[0, i, :height, :width] = mask_api.decode(
          {**ann['segmentation'], 'counts': ann['segmentation']['counts'].encode()})
      labels[0, i] = (ann['category_id'] - 1 + shift_labels) % 10
      kept[0, i] = True
    batches.append({'boxes': boxes, 'scores': np.where(kept, 0.9, 0.0), 'labels': labels,
                    'kept': kept, 'image_id': np.array([image_id]), 'masks': masks,
                    'original_size': np.array([[height, width]])})
  return batches


def test_boxes_and_masks_are_scored_and_written_in_cocos_results_format(ground_truth, tmp_path):
  path = tmp_path / 'predictions.json'
  evaluator = coco.CocoEvaluator(ground_truth, range(1, 11), iou_types=('bbox', 'segm'),
                                 predictions_path=path, fetch_every=2)
  for outputs in _outputs(ground_truth):
    evaluator.add(outputs)
  results = evaluator.result()
  assert list(results) == list(coco.METRICS) + [f'segm_{name}' for name in coco.METRICS]
  for name in ('AP', 'AP50', 'AR100', 'segm_AP', 'segm_AP75', 'segm_AR100'):
    assert results[name] == pytest.approx(1.0), name
  written = json.loads(path.read_text())
  assert len(written) == len(ground_truth.anns)
  for detection in written:
    assert set(detection) == {'image_id', 'category_id', 'bbox', 'score', 'segmentation'}
    assert isinstance(detection['segmentation']['counts'], str)
    height, width = (ground_truth.imgs[detection['image_id']][k] for k in ('height', 'width'))
    assert detection['segmentation']['size'] == [height, width]

  wrong = coco.CocoEvaluator(ground_truth, range(1, 11), iou_types=('segm',))
  for outputs in _outputs(ground_truth, shift_labels=1):
    wrong.add(outputs)
  wrong_results = wrong.result()
  assert list(wrong_results) == [f'segm_{name}' for name in coco.METRICS]
  assert wrong_results['segm_AP'] == 0.0
  assert coco.coco_metrics(ground_truth, [], 'segm')['segm_AP'] == 0.0
  with pytest.raises(ValueError, match=r"iou_types must be some of \('bbox', 'segm'\)"):
    coco.CocoEvaluator(ground_truth, range(1, 11), iou_types=('keypoints',))
