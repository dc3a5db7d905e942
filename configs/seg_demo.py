"""Semantic segmentation of synthetic digit scenes with a reduced SecViT and Semantic FPN: trains
in minutes on a 2-core CPU.

  python train.py --config=configs/seg_demo.py

Scenes of scikit-learn's handwritten digits pasted on smooth colour backgrounds
(`secvit_jax.data.digit_scenes`); 11 classes: the background and the ink of each digit. They are
written once as JPEG images and label PNGs to `data_dir` (default
~/.cache/secvit_jax/digit_scenes/<settings hash>) and read back by the real data path, in the
'folder' layout of ADE20K.
The held-out scenes show held-out digits. ADE20K's recipe, shrunk: small scenes and crops, a
small backbone and heads, a short poly schedule, light augmentation (no flip: mirrored digits are
other shapes).
"""

import ml_collections

from configs import ade20k_common


def get_config():
  config = ade20k_common.recipe('secvit_t', 'semantic_fpn')
  config.model.update({
      'embed_dims': (32, 64, 96, 128),
      'depths': (1, 1, 2, 1),
      'num_heads': (2, 4, 4, 8),
      'num_clusters': (4, 2, 1, -1),
      'tokens_per_cluster': (64, 64, 0, 0),
      'drop_path_rate': 0.05,
  })
  config.head.update({'channels': 64, 'neck_channels': 64})
  config.dtype = 'float32'  # bfloat16 is slow on CPUs.

  config.dataset = 'digit_scenes'
  config.digit_scenes = ml_collections.ConfigDict({
      'seed': 0,
      'num_train': 3000,
      'num_val': 200,
      'height': (60, 80),  # Each scene's size is drawn in these (inclusive) ranges.
      'width': (80, 112),
      'digits': (2, 5),  # Digits per scene (fewer when they do not fit).
      'digit_sizes': (20, 36),  # Side of a pasted digit's square, in pixels.
      'image_format': 'jpg',
  })
  config.batch_size = 16
  config.eval_batch_size = 50
  config.input.update({
      'scale': (128, 64),  # Short sides of 48-80 pixels (ratios 0.75-1.25), 64×64 crops.
      'ratio_range': (0.75, 1.25),
      'crop_size': (64, 64),
      'cat_max_ratio': 1.0,  # Off: the background covers most of any crop.
      'hflip': False,
  })
  # The held-out scenes at a short side of 64: 2 shape buckets (compilations).
  config.eval.update({'scale': (128, 64), 'bucket_multiple': 64, 'crop_size': (64, 64),
                      'stride': (43, 43)})

  config.total_steps = 1500
  config.optimizer.update({'base_lr': 2e-3, 'warmup_steps': 100, 'warmup_lr': 1e-6,
                           'min_lr': 1e-5, 'weight_decay': 1e-4})
  config.eval_every_steps = 250
  config.checkpoint_every_steps = 500
  config.log_every_steps = 50
  return config
