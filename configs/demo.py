"""A reduced SecViT on scikit-learn's handwritten digits: trains in minutes on a 2-core CPU.

  python train.py --config=configs/demo.py

The release's recipe with a small model, 32×32 images and light augmentation (the digits are
8×8 images; mirroring or heavy RandAugment would only make them harder to tell apart).
"""

from configs import common


def get_config():
  config = common.recipe('secvit_t')
  config.model.update({
      'embed_dims': (32, 64, 96, 128),
      'depths': (1, 1, 2, 1),
      'num_heads': (2, 4, 4, 8),
      'num_clusters': (4, 2, 1, -1),  # 32×32 images: 8², 4², 2², 1² tokens per stage.
      'projection': 128,
      'drop_path_rate': 0.05,
  })
  config.dtype = 'float32'  # bfloat16 is slow on CPUs.

  config.dataset = 'digits'  # 1437 training and 360 held-out images.
  config.eval_split = 'test'
  config.image_size = 32
  config.batch_size = 64
  config.eval_batch_size = 120
  config.input.crop_scale = (0.5, 1.0)
  config.input.hflip = False
  config.input.randaugment = ''
  config.input.random_erasing = 0.0
  config.input.repeated_augmentations = 1
  config.mixup.mixup_alpha = 0.0
  config.mixup.cutmix_alpha = 0.0

  config.total_epochs = 30.0
  config.optimizer.base_lr = 8e-3  # × 64 / 512: a peak learning rate of 1e-3.
  config.optimizer.warmup_epochs = 2.0
  config.ema_decay = 0.9  # Per 512 images, so 0.987 per step: about the last 3 epochs.
  config.eval_every_epochs = 5.0
  config.checkpoint_every_epochs = 10.0
  config.log_every_steps = 50
  return config
