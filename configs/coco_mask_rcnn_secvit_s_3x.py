r"""Mask R-CNN 3x with a SecViT-S backbone on COCO 2017 (global batch 16, 36 epochs, multi-scale).

  python train.py --config=configs/coco_mask_rcnn_secvit_s_3x.py --workdir=WORKDIR \
      --config.data_dir=/path/to/coco --config.init_from=/path/to/secvit_s

Multi-scale training: short sides 480-800, and half the images randomly cropped first (see
`coco_mask_rcnn_common`).
"""

from configs import coco_mask_rcnn_common


def get_config():
  return coco_mask_rcnn_common.recipe('secvit_s', '3x')
