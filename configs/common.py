"""The release's ImageNet-1k recipe, shared by the four variant configs.

Every duration is a `<name>_steps` field or a `<name>_epochs` field; a `_steps` value, when set,
takes precedence (e.g. `--config.total_steps=1000`). One step is one global batch.
"""

import ml_collections
from ml_collections import config_dict

from secvit_jax import model as model_lib


def model_config(variant: str, **fields) -> ml_collections.ConfigDict:
  """`config.model` of every task: `name` is a variant of `secvit_jax.model.VARIANTS`; every other
  field overrides it (`create_model`, `create_backbone`); `fields` add or replace some. Stochastic
  depth: the variant's classification rate."""
  return ml_collections.ConfigDict({
      'name': variant,
      'drop_path_rate': model_lib.VARIANTS[variant]['drop_path_rate'],
      'remat': False,  # Recompute block activations in the backward pass to save memory.
      'dwconv_impl': 'auto',  # Depthwise convs: 'auto', 'native', 'shift' or 'xla' (model.py).
      'attention_impl': 'auto',  # In the clusters: 'auto', 'einsum' or 'cudnn' (GPU; sec.py).
      **fields,
  })


def recipe(variant: str) -> ml_collections.ConfigDict:
  """The release's training of SecViT `variant` ('secvit_t', ...) on ImageNet-1k at 224×224."""
  config = ml_collections.ConfigDict()
  config.task = 'classification'  # See `secvit_jax.tasks`.

  config.model = model_config(variant)
  config.dtype = 'bfloat16'  # Compute; parameters and optimizer state stay float32.

  # Data (see `secvit_jax.data.classification`).
  config.dataset = 'imagenet2012'
  config.data_dir = config_dict.placeholder(str)  # None: $TFDS_DATA_DIR or TFDS's default.
  config.train_split = 'train'
  config.eval_split = 'validation'
  config.image_size = 224
  config.batch_size = 1024  # Global: 8 GPUs × 128 in the release.
  config.eval_batch_size = 1024
  config.seed = 0
  # Host-side training preprocessing, as timm's for the release (`secvit_jax.data`).
  config.input = ml_collections.ConfigDict({
      # Crop a random window (area fraction in crop_scale, aspect ratio in crop_ratio) and resize
      # it to image_size (bicubic); off: resize the shorter side and take the central square.
      'random_resized_crop': True,
      'crop_scale': (0.08, 1.0),
      'crop_ratio': (3 / 4, 4 / 3),
      'hflip': True,  # Mirror left-right with probability 0.5.
      'randaugment': 'rand-m9-mstd0.5-inc1',  # A timm RandAugment spec; '' is off.
      'random_erasing': 0.25,  # Probability of erasing a rectangle with per-pixel noise.
      # Copies of each drawn image, each augmented independently, next to each other; 1 is off.
      'repeated_augmentations': 3,
      'shuffle_buffer': 10_000,  # Examples in a TFDS stream's shuffle buffer.
      'prefetch': 2,  # Global batches kept in flight to the devices.
  })
  # On-device mixing of each training batch with its reverse and the targets' label smoothing
  # (`secvit_jax.mixup`); alphas 0 turn a method off.
  config.mixup = ml_collections.ConfigDict({
      'mixup_alpha': 0.8,
      'cutmix_alpha': 1.0,
      'switch_prob': 0.5,  # CutMix rather than Mixup on a batch, when both are on.
      'label_smoothing': 0.1,
  })

  # Optimizer: AdamW, linear warm-up then cosine decay, learning rate scaled with the batch
  # (see `secvit_jax.train_lib.create_optimizer`).
  config.total_epochs = 300.0
  config.total_steps = config_dict.placeholder(int)
  config.optimizer = ml_collections.ConfigDict({
      'base_lr': 5e-4,  # × (batch_size × accumulation_steps) / base_batch_size.
      'base_batch_size': 512,
      'schedule': 'cosine',  # 'cosine' (timm), 'poly' (mmseg) or 'step' (mmdet).
      'warmup_lr': 1e-6,
      'min_lr': 1e-5,
      'warmup_epochs': 5.0,
      'warmup_steps': config_dict.placeholder(int),
      'b1': 0.9,
      'b2': 0.999,
      'eps': 1e-8,
      'weight_decay': 0.05,
      'weight_decay_rule': 'timm',  # Not on biases and normalization scales (1-D tensors).
      'grad_clip_norm': 0.0,  # 0: no clipping (the release).
      'accumulation_steps': 1,  # Micro-batches of `batch_size` per optimizer update.
  })
  config.ema_decay = 0.99996  # Per 512 images: per step 0.99996 ** (batch / 512); 0: no EMA.

  # Mesh: batches split over data × fsdp; parameters sharded over fsdp by `sharding_rules`
  # ((regex over the array's path, 'fsdp' or 'replicate'), ...; see `secvit_jax.sharding`).
  config.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1})
  config.sharding_rules = (('.*', 'fsdp'),)

  # Evaluation, checkpoints (orbax, WORKDIR/checkpoints), logs.
  config.eval_every_epochs = 1.0
  config.eval_every_steps = config_dict.placeholder(int)
  config.checkpoint_every_epochs = 1.0
  config.checkpoint_every_steps = config_dict.placeholder(int)
  config.keep_checkpoints = 3  # The newest few; the best by EMA top-1 is kept besides.
  config.log_every_steps = 100

  # Start from a converted release checkpoint or a training workdir (a different number of
  # classes re-initializes the head); with eval_only, evaluate it (or the workdir's newest
  # checkpoint) and exit.
  config.init_from = config_dict.placeholder(str)
  config.eval_only = False
  return config
