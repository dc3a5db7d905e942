"""The release's ImageNet-1k recipe (SPEC §5), shared by the four variant configs.

Every duration is a `<name>_steps` field or a `<name>_epochs` field; a `_steps` value, when set,
takes precedence (e.g. `--config.total_steps=1000`). One step is one global batch.
"""

import ml_collections
from ml_collections import config_dict

from secvit_jax import input_pipeline
from secvit_jax import model as model_lib


def recipe(variant: str) -> ml_collections.ConfigDict:
  """The release's training of SecViT `variant` ('secvit_t', ...) on ImageNet-1k at 224×224."""
  config = ml_collections.ConfigDict()

  # Model: `name` is a variant of `secvit_jax.model.VARIANTS`; every other field overrides it.
  config.model = ml_collections.ConfigDict({
      'name': variant,
      'drop_path_rate': model_lib.VARIANTS[variant]['drop_path_rate'],
      'remat': False,  # Recompute block activations in the backward pass to save memory.
      'dwconv_impl': 'auto',  # Depthwise convs: 'auto', 'native', 'shift' or 'xla' (model.py).
  })
  config.dtype = 'bfloat16'  # Compute; parameters and optimizer state stay float32.

  # Data (see `secvit_jax.input_pipeline`).
  config.dataset = 'imagenet2012'
  config.data_dir = config_dict.placeholder(str)  # None: $TFDS_DATA_DIR or TFDS's default.
  config.train_split = 'train'
  config.eval_split = 'validation'
  config.image_size = 224
  config.batch_size = 1024  # Global: 8 GPUs × 128 in the release.
  config.eval_batch_size = 1024
  config.seed = 0
  config.input = input_pipeline.default_input_config()

  # Optimizer: AdamW, linear warm-up then cosine decay, learning rate scaled with the batch.
  config.total_epochs = 300.0
  config.total_steps = config_dict.placeholder(int)
  config.optimizer = ml_collections.ConfigDict({
      'base_lr': 5e-4,  # Per 512 images: × (batch_size × accumulation_steps) / 512.
      'warmup_lr': 1e-6,
      'min_lr': 1e-5,
      'warmup_epochs': 5.0,
      'warmup_steps': config_dict.placeholder(int),
      'b1': 0.9,
      'b2': 0.999,
      'eps': 1e-8,
      'weight_decay': 0.05,  # Not on biases and normalization scales (1-D tensors).
      'grad_clip_norm': 0.0,  # 0: no clipping (the release).
      'accumulation_steps': 1,  # Micro-batches of `batch_size` per optimizer update.
  })
  config.ema_decay = 0.99996  # Per 512 images: per step 0.99996 ** (batch / 512).

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
