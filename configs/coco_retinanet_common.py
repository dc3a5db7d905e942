"""RetinaNet 1x on COCO with a SecViT backbone: the recipe shared by the four variant configs.

mmdet's RetinaNet as the SecViT authors' sibling backbone RMT trains it (its configs): 12 epochs,
the learning rate ×0.1 after epochs 8 and 11, 500 warm-up iterations from 0.001 of it, global
batch 16, AdamW (lr 4e-4, weight decay 1e-4 on every parameter), images resized to fit 1333×800
and flipped with probability 0.5, bfloat16 compute. Every duration is a `<name>_steps` or a
`<name>_epochs` field; a `_steps` value, when set, takes precedence.
"""

import ml_collections
from ml_collections import config_dict

from configs import common


def recipe(variant: str) -> ml_collections.ConfigDict:
  """RetinaNet 1x with SecViT `variant` ('secvit_t', ...) on COCO 2017."""
  config = ml_collections.ConfigDict()
  config.task = 'detection'  # See `secvit_jax.tasks`.

  # Backbone (`secvit_jax.model.create_backbone`): clusters keep the size they have at 224×224 in
  # ImageNet training (98 tokens) in the first three stages; the last stage attends globally, as
  # in classification. Remat: secvit_s's step on the 1344² canvas needs 16.2 GiB per chip of a
  # v5e:2x4 without it, 11.2 with it (benchmarks/results/tpu_secvit_s_retinanet_*); chips of 32
  # GiB can do without (--config.model.remat=False, about 8% fewer FLOPs).
  config.model = common.model_config(variant, tokens_per_cluster=(98, 98, 98, 0), remat=True)
  config.dtype = 'bfloat16'  # Compute; parameters and optimizer state stay float32.

  # The detector (`secvit_jax.tasks.detectors`), its settings in the config field of its name.
  config.detector = 'retinanet'
  # Neck, head, anchors, assignment, loss and decoding (`secvit_jax.heads.retinanet`).
  config.retinanet = ml_collections.ConfigDict({
      'fpn_features': 256,  # FPN from stride 8, two extra levels: strides 8-128.
      'head_features': 256,
      'stacked_convs': 4,  # 3×3 conv + ReLU layers of the class and the box subnets.
      'anchor_strides': (8, 16, 32, 64, 128),
      'octave_base_scale': 4.0,  # Anchor sides 4 · stride · 2^(k / 3), k = 0, 1, 2.
      'scales_per_octave': 3,
      'anchor_ratios': (0.5, 1.0, 2.0),  # Height / width.
      'positive_iou': 0.5,
      'negative_iou': 0.4,
      # Anchors lying >= this fraction inside a crowd box are ignored; <= 0 drops crowd boxes
      # (then anchors on crowds are negatives, as mmdet's ignore_iof_thr=-1 in RMT's config).
      'crowd_iof': 0.5,
      'size_divisor': 32,
      'focal_alpha': 0.25,
      'focal_gamma': 2.0,
      'box_loss_weight': 1.0,  # L1 on the (dx, dy, dw, dh) deltas (means 0, stds 1).
      'score_threshold': 0.05,
      'pre_nms_top_k': 1000,  # Candidates per level.
      'nms_iou': 0.5,
      'max_detections': 100,
  })

  # Data (see `secvit_jax.data.detection`): the COCO layout under data_dir, or a TFDS name
  # such as 'coco/2017'.
  config.dataset = 'coco'
  config.data_dir = config_dict.placeholder(str)
  # None: the dataset's own ('train' and 'val' of a COCO folder, 'train' and 'validation' of
  # TFDS).
  config.train_split = config_dict.placeholder(str)
  config.eval_split = config_dict.placeholder(str)
  config.max_boxes = 100  # Ground-truth boxes per image, padded; more is an error.
  config.input = ml_collections.ConfigDict({
      'max_size': (1333, 800),  # (long, short) side: resize to fit, keeping the aspect ratio.
      # Every image lies at the top left of this fixed canvas (H, W), zero padding masked; a
      # square fits both orientations of a 1333×800 image.
      'canvas_size': (1344, 1344),
      'hflip': True,
      'shuffle_buffer': 1_000,  # Examples in a TFDS stream's shuffle buffer.
      'prefetch': 2,
  })
  config.batch_size = 16  # Global: 8 GPUs × 2 in mmdet.
  config.eval_batch_size = 16
  config.seed = 0

  # Optimizer: AdamW, mmcv's linear warm-up, step decay (`secvit_jax.train_lib`).
  config.total_epochs = 12.0
  config.total_steps = config_dict.placeholder(int)
  config.optimizer = ml_collections.ConfigDict({
      'base_lr': 4e-4,  # × batch_size / base_batch_size. (mmdet's Swin recipes use 1e-4.)
      'base_batch_size': 16,
      'schedule': 'step',
      'decay_epochs': (8, 11),  # ×decay_factor after these epochs ...
      'decay_steps': config_dict.placeholder(tuple),  # ... or these steps, when set.
      'decay_factor': 0.1,
      'warmup_steps': 500,
      'warmup_epochs': config_dict.placeholder(float),
      'warmup_lr': 4e-7,  # 0.001 × the peak: the warm-up's starting rate.
      'min_lr': 0.0,
      'b1': 0.9,
      'b2': 0.999,
      'eps': 1e-8,
      'weight_decay': 1e-4,
      'weight_decay_rule': 'all',  # mmdet without paramwise_cfg decays every parameter.
      'grad_clip_norm': 0.0,
      'accumulation_steps': 1,
  })
  config.ema_decay = 0.0  # No EMA.

  # Mesh: batches split over data × fsdp; parameters sharded over fsdp by `sharding_rules`.
  config.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1})
  config.sharding_rules = (('.*', 'fsdp'),)

  # Evaluation (COCOeval on the eval split), checkpoints, logs.
  config.eval_every_epochs = 1.0
  config.eval_every_steps = config_dict.placeholder(int)
  config.checkpoint_every_epochs = 1.0
  config.checkpoint_every_steps = config_dict.placeholder(int)
  config.keep_checkpoints = 3  # The newest few; the best by eval/AP is kept besides.
  config.log_every_steps = 50
  # Write each evaluation's detections in COCO's results format to
  # WORKDIR/predictions/<eval>_step_<step>.json.
  config.save_predictions = False

  # Start from a classifier (a converted release checkpoint or a classification workdir: loads
  # the backbone) or a detector; with eval_only, evaluate it (or the workdir's newest checkpoint).
  config.init_from = config_dict.placeholder(str)
  config.eval_only = False
  return config
