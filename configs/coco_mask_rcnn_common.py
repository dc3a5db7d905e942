"""Mask R-CNN on COCO with a SecViT backbone: the recipe shared by the 1x and 3x variant configs.

mmdet 2.x's Mask R-CNN as the SecViT authors' sibling backbone RMT trains it (its configs): AdamW
(betas 0.9, 0.999, weight decay 0.05, none on normalization parameters), global batch 16,
500 warm-up iterations from 0.001 of the rate, bfloat16 compute, the data, evaluation and
checkpointing of `coco_retinanet_common`. 1x: 12 epochs, the rate ×0.1 after epochs 8 and 11;
3x: 36 epochs, after 27 and 33, on several scales (flipped with probability 0.5, then with
probability 0.5 each: (a) resized to a short side of 480, 512, ..., 800, the long side at most
1333; (b) resized to a short side of 400, 500 or 600, a random crop of 384-600 pixels a side, then
(a)). Stochastic depth: the variant's classification rate (T 0.1, S 0.15, B 0.4, L 0.5).
"""

import ml_collections

from configs import coco_retinanet_common

# Peak learning rates of RMT's Mask R-CNN configs, by (variant, schedule).
LEARNING_RATES = {('secvit_t', '1x'): 4e-4, ('secvit_s', '1x'): 4e-4, ('secvit_b', '1x'): 4e-4,
                  ('secvit_l', '1x'): 2e-4, ('secvit_s', '3x'): 4e-4, ('secvit_b', '3x'): 2e-4}
# (epochs, the epochs after which the rate drops) of each schedule.
SCHEDULES = {'1x': (12.0, (8, 11)), '3x': (36.0, (27, 33))}


def recipe(variant: str, schedule: str = '1x') -> ml_collections.ConfigDict:
  """Mask R-CNN `schedule` ('1x' or '3x') with SecViT `variant` ('secvit_t', ...) on COCO 2017."""
  config = coco_retinanet_common.recipe(variant)
  del config.retinanet

  config.detector = 'mask_rcnn'
  # Neck, RPN, RoI heads, sampling and decoding (`secvit_jax.heads.mask_rcnn`).
  config.mask_rcnn = ml_collections.ConfigDict({
      'fpn_features': 256,  # FPN on all four maps, P6 by stride-2 subsampling: strides 4-64.
      'rpn_features': 256,
      'fc_features': 1024,  # Shared2FC box head.
      'mask_features': 256,
      'mask_convs': 4,
      'anchor_strides': (4, 8, 16, 32, 64),
      'anchor_scale': 8.0,  # Anchor sides 8 · stride.
      'anchor_ratios': (0.5, 1.0, 2.0),  # Height / width.
      'size_divisor': 32,
      'rpn_positive_iou': 0.7,
      'rpn_negative_iou': 0.3,
      'rpn_min_best_iou': 0.3,  # A box's best anchors are positive from this IoU.
      'rpn_num_samples': 256,  # Anchors per image in the RPN loss ...
      'rpn_positive_fraction': 0.5,  # ... at most this fraction positive.
      'train_pre_nms_top_k': 2000,  # Proposals per level before NMS, in training ...
      'test_pre_nms_top_k': 1000,  # ... and in evaluation.
      'proposal_nms_iou': 0.7,  # Per level.
      'num_proposals': 1000,  # Over the levels.
      'roi_num_samples': 512,  # RoIs per image in training (ground truths among the proposals).
      'roi_positive_fraction': 0.25,
      'roi_positive_iou': 0.5,
      'num_mask_rois': 128,  # Mask head slots per image: 512 × 0.25.
      'sampling_ratio': 2,  # RoIAlign's bilinear samples per bin side.
      'box_stds': (0.1, 0.1, 0.2, 0.2),
      'score_threshold': 0.05,
      'pre_nms_top_k': 1000,  # (RoI, class) pairs per image before class-wise NMS.
      'nms_iou': 0.5,
      'max_detections': 100,
      'mask_crop_size': 112,  # Each ground truth's mask over its box, in training batches.
  })

  epochs, decay_epochs = SCHEDULES[schedule]
  config.total_epochs = epochs
  config.optimizer.decay_epochs = decay_epochs
  config.optimizer.base_lr = LEARNING_RATES[variant, schedule]
  config.optimizer.warmup_lr = 0.001 * config.optimizer.base_lr
  config.optimizer.weight_decay = 0.05
  config.optimizer.weight_decay_rule = 'not_norms'
  if schedule == '3x':  # Multi-scale training (`secvit_jax.data.detection.Transform`).
    config.input.short_sides = tuple(range(480, 801, 32))  # Policy (a), long side <= 1333.
    config.input.crop_short_sides = (400, 500, 600)  # Policy (b): resize, crop, then (a).
    config.input.crop_size = (384, 600)
  return config
