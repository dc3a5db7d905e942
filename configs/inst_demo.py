"""Mask R-CNN with a reduced SecViT on scenes of handwritten digits, boxes and masks, trained in
minutes on a CPU.

  python train.py --config=configs/inst_demo.py

The scenes of `det_demo` (`secvit_jax.data.digit_scenes`: 1-4 digits pasted at random places and
scales on 128×128 canvases, each digit's ink its instance mask, written once in the COCO layout
under `data_dir`), read by the COCO reader and scored by pycocotools' COCOeval on boxes and masks
as a COCO run is. The recipe of `coco_mask_rcnn_common` with the backbone of `det_demo`, narrow
heads, anchors scaled to the digits, fewer proposals and sampled RoIs, and no flipping.
"""

from configs import coco_mask_rcnn_common
from configs import det_demo


def get_config():
  config = coco_mask_rcnn_common.recipe('secvit_t')
  scenes = det_demo.get_config()
  config.model = scenes.model  # A backbone of 32-128 channels, one or two blocks per stage.
  config.dtype = 'float32'  # bfloat16 is slow on CPUs.
  config.mask_rcnn.update({
      'fpn_features': 64,
      'rpn_features': 64,
      'fc_features': 256,
      'mask_features': 32,
      'mask_convs': 2,
      'anchor_scale': 4.0,  # Anchor sides 16-256 px: the digits are 20-48 px.
      'train_pre_nms_top_k': 500,
      'test_pre_nms_top_k': 500,
      'num_proposals': 200,
      'roi_num_samples': 64,
      'num_mask_rois': 16,
      'pre_nms_top_k': 400,
      'mask_crop_size': 56,  # Finer than the digits' pixels.
  })

  for name in ('dataset', 'data_dir', 'digit_scenes', 'input', 'batch_size', 'eval_batch_size'):
    config[name] = scenes[name]
  config.max_boxes = 4  # The most digits of a scene.

  config.total_steps = 300
  config.optimizer.update({
      'base_lr': 1e-3,
      'decay_epochs': (),
      'decay_steps': (240,),
      'warmup_steps': 30,
      'warmup_lr': 1e-6,
      'weight_decay': 0.05,
  })
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 100
  config.log_every_steps = 25
  return config
