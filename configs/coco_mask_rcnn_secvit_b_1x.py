r"""Mask R-CNN 1x with a SecViT-B backbone on COCO 2017 (global batch 16, 12 epochs).

  python train.py --config=configs/coco_mask_rcnn_secvit_b_1x.py --workdir=WORKDIR \
      --config.data_dir=/path/to/coco --config.init_from=/path/to/secvit_b
"""

from configs import coco_mask_rcnn_common


def get_config():
  return coco_mask_rcnn_common.recipe('secvit_b')
