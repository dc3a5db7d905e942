r"""Mask R-CNN 1x with a SecViT-S backbone on COCO 2017 (global batch 16, 12 epochs).

  python train.py --config=configs/coco_mask_rcnn_secvit_s_1x.py --workdir=WORKDIR \
      --config.data_dir=/path/to/coco --config.init_from=/path/to/secvit_s
"""

from configs import coco_mask_rcnn_common


def get_config():
  return coco_mask_rcnn_common.recipe('secvit_s')
