"""mmseg's ADE20K recipes for SecViT, shared by the configs/ade20k_*.py files (as mmseg's and
RMT's configs set them):

  Semantic FPN  80k iterations at batch 16, AdamW lr 1e-4, weight decay 1e-4 on every parameter,
                poly decay (power 0.9) to 1e-6, no warm-up.
  UperNet       160k iterations at batch 16, AdamW lr 6e-5, weight decay 0.01 except on norms,
                1,500 warm-up iterations from 1e-6 × the rate, then poly decay (power 1.0) to 0;
                auxiliary FCN head on the stride-16 map, loss weight 0.4.
Both: 512×512 crops of images rescaled by 0.5-2.0 around 2048×512, mmseg's augmentation,
bfloat16 compute, the backbone's stochastic depth at its classification rate, no EMA;
single-scale evaluation of each whole image resized to fit 2048×512.

Every duration is a `<name>_steps` or `<name>_epochs` field; a `_steps` value takes precedence.
"""

import ml_collections
from ml_collections import config_dict

from configs import common

HEADS = ('semantic_fpn', 'upernet')


def recipe(variant: str, head: str) -> ml_collections.ConfigDict:
  """SecViT `variant` ('secvit_t', ...) with `head` ('semantic_fpn' or 'upernet') on ADE20K."""
  if head not in HEADS:
    raise ValueError(f'head must be one of {HEADS}, got {head!r}')
  upernet = head == 'upernet'
  config = ml_collections.ConfigDict()
  config.task = 'segmentation'  # See `secvit_jax.tasks`.

  # Backbone (`secvit_jax.model.create_backbone`): clusters of 98 tokens in stages 0-2, as at
  # 224×224 in classification; global attention in stage 3 (see `secvit_jax.model.SecViTStages`).
  config.model = common.model_config(variant, tokens_per_cluster=(98, 98, 98, 0))
  # Head (see `secvit_jax.heads.segmentation.create_segmenter`).
  config.head = ml_collections.ConfigDict({
      'name': head,
      'channels': 512 if upernet else 128,  # Of the decode head.
      'neck_channels': 256,  # Semantic FPN's FPN neck.
      'pool_scales': (1, 2, 3, 6),  # UperNet's pyramid pooling.
      'dropout': 0.1,  # Channel dropout before each classifier.
      'auxiliary': upernet,  # An FCN head on the stride-16 map, trained with weight:
      'auxiliary_weight': 0.4,
      'auxiliary_channels': 256,
      'auxiliary_in_index': 2,
  })
  config.dtype = 'bfloat16'  # Compute; parameters and optimizer state stay float32.

  # Data (see `secvit_jax.data.segmentation`): 'ade20k' (data_dir = .../ADEChallengeData2016)
  # or 'folder' (a user's images and label PNGs, described by config.folder).
  config.dataset = 'ade20k'
  config.data_dir = config_dict.placeholder(str)
  config.train_split = 'training'
  config.eval_split = 'validation'
  config.folder = ml_collections.ConfigDict({
      'images': 'images/{split}',  # Relative to data_dir; '{split}': the split's name.
      'labels': 'annotations/{split}',  # <image name>.png, single-channel class indices.
      'num_classes': config_dict.placeholder(int),
      'ignore_index': 255,  # The label value of unlabelled pixels.
      'reduce_zero_label': False,  # True: value 0 is unlabelled and k is class k - 1 (ADE20K).
      'class_names': (),  # One per class; () for '0', '1', ...
  })
  config.batch_size = 16  # Global: 8 GPUs × 2 in mmseg.
  config.eval_batch_size = 8
  config.seed = 0
  # Training augmentation, on the host (mmseg's pipeline).
  config.input = ml_collections.ConfigDict({
      'scale': (2048, 512),  # Resized to fit this (keeping the aspect ratio) times a ratio...
      'ratio_range': (0.5, 2.0),  # ... drawn uniformly in this range.
      'crop_size': (512, 512),  # (H, W) random crop, padded to this when smaller.
      'cat_max_ratio': 0.75,  # Redraw crops where a class covers this much (1: off).
      'hflip': True,  # Mirror left-right with probability 0.5.
      'photometric': True,  # Brightness, contrast, saturation, hue.
      'prefetch': 2,  # Global batches kept in flight to the devices.
  })
  # Evaluation: 'whole' images resized to fit `scale`, or 'slide' windows of crop_size at
  # stride; shape buckets of bucket_multiple pixels (one compilation each).
  config.eval = ml_collections.ConfigDict({
      'mode': 'whole',
      'scale': (2048, 512),
      'size_divisor': 1,  # > 1: sizes rounded up to a multiple (mmseg's AlignedResize: 32).
      'bucket_multiple': 128,
      'crop_size': (512, 512),
      'stride': (341, 341),
  })
  # Write each evaluated image's predicted label map (WORKDIR/predictions/...).
  config.save_predictions = False

  # Optimizer: AdamW with mmseg's poly schedule (see `secvit_jax.train_lib.create_optimizer`).
  config.total_steps = 160_000 if upernet else 80_000
  config.total_epochs = config_dict.placeholder(float)
  config.optimizer = ml_collections.ConfigDict({
      'base_lr': 6e-5 if upernet else 1e-4,  # × batch_size × accumulation_steps / 16.
      'base_batch_size': 16,
      'schedule': 'poly',
      'power': 1.0 if upernet else 0.9,
      'min_lr': 0.0 if upernet else 1e-6,
      'warmup_steps': 1500 if upernet else 0,
      'warmup_epochs': config_dict.placeholder(float),
      'warmup_lr': 6e-5 * 1e-6 if upernet else 0.0,  # The warm-up starts at 1e-6 × the rate.
      'b1': 0.9,
      'b2': 0.999,
      'eps': 1e-8,
      'weight_decay': 0.01 if upernet else 1e-4,
      'weight_decay_rule': 'not_norms' if upernet else 'all',
      'grad_clip_norm': 0.0,
      'accumulation_steps': 1,
  })
  config.ema_decay = 0.0  # No EMA (per 512 images, as classification's, when set).

  # Mesh: batches split over data × fsdp; parameters sharded over fsdp by `sharding_rules`.
  config.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1})
  config.sharding_rules = (('.*', 'fsdp'),)

  # Evaluation, checkpoints (orbax, WORKDIR/checkpoints), logs.
  config.eval_every_steps = 16_000 if upernet else 8_000
  config.eval_every_epochs = config_dict.placeholder(float)
  config.checkpoint_every_steps = 16_000 if upernet else 8_000
  config.checkpoint_every_epochs = config_dict.placeholder(float)
  config.keep_checkpoints = 3  # The newest few; the best by mIoU is kept besides.
  config.log_every_steps = 50

  # Start from a converted release checkpoint or a classification workdir (the backbone), or a
  # segmentation workdir (everything; classifiers of another class count re-initialized); with
  # eval_only, evaluate it (or the workdir's newest checkpoint) and exit.
  config.init_from = config_dict.placeholder(str)
  config.eval_only = False
  return config
