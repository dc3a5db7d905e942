r"""Mask R-CNN 3x with a SecViT-S backbone on COCO 2017 (global batch 16, 36 epochs).

  python train.py --config=configs/coco_mask_rcnn_secvit_s_3x.py --workdir=WORKDIR \
      --config.data_dir=/path/to/coco --config.init_from=/path/to/secvit_s

RMT's 3x recipe also trains on several scales (short side 480-800, and random crops); the data
pipeline resizes every image to fit 1333×800, so this trains the 3x schedule at that one scale.
"""

from configs import coco_mask_rcnn_common


def get_config():
  return coco_mask_rcnn_common.recipe('secvit_s', '3x')
