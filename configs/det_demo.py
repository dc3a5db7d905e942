"""RetinaNet with a reduced SecViT on scenes of handwritten digits, trained in minutes on a CPU.

  python train.py --config=configs/det_demo.py

The scenes (`secvit_jax.data.digit_scenes`: 1-4 digits pasted at random places and scales on
128×128 canvases) are written once under `data_dir` (default
~/.cache/secvit_jax/digit_scenes/<settings hash>) and read in the COCO layout, so that the demo
runs the COCO reader and pycocotools' COCOeval exactly as a COCO run does. The recipe of
`coco_retinanet_common` with a small backbone, neck and head, anchors scaled to the digits'
sizes, and no flipping (mirrored digits are other shapes).
"""

import ml_collections

from configs import coco_retinanet_common


def get_config():
  config = coco_retinanet_common.recipe('secvit_t')
  config.model.update({
      'embed_dims': (32, 64, 96, 128),
      'depths': (1, 1, 2, 1),
      'num_heads': (2, 4, 4, 8),
      'num_clusters': (4, 2, 1, -1),  # 128×128 images: 32², 16², 8², 4² tokens per stage.
      'tokens_per_cluster': (),
      'drop_path_rate': 0.0,
      'remat': False,  # Small enough for any memory; recomputing would only cost time.
  })
  config.dtype = 'float32'  # bfloat16 is slow on CPUs.
  config.retinanet.update({
      'fpn_features': 64,
      'head_features': 64,
      'stacked_convs': 2,
      'octave_base_scale': 2.0,  # Anchor sides 16-25 px at stride 8, up to 200 at stride 128.
  })

  config.dataset = 'digit_scenes'
  config.data_dir = None  # ~/.cache/secvit_jax/digit_scenes/<settings hash>.
  config.digit_scenes = ml_collections.ConfigDict({
      'seed': 0,
      'num_train': 2000,  # Scenes of the digits' training split.
      'num_val': 300,  # Scenes of its held-out split.
      'height': 128,
      'width': 128,
      'digits': (1, 4),  # Per scene.
      'digit_sizes': (20, 48),  # Side in pixels of a pasted digit's square.
      'image_format': 'png',
  })
  config.input.max_size = (128, 128)  # The scenes as they are.
  config.input.canvas_size = (128, 128)
  config.input.hflip = False
  config.batch_size = 16
  config.eval_batch_size = 100

  config.total_steps = 1000
  config.optimizer.base_lr = 1e-3
  config.optimizer.decay_epochs = ()
  config.optimizer.decay_steps = (800,)
  config.optimizer.warmup_steps = 50
  config.optimizer.warmup_lr = 1e-6
  config.optimizer.weight_decay = 0.05
  config.eval_every_steps = 250
  config.checkpoint_every_steps = 250
  config.log_every_steps = 50
  return config
