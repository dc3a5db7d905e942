r"""RetinaNet 1x with a SecViT-T backbone on COCO 2017 (global batch 16, 12 epochs).

  python train.py --config=configs/coco_retinanet_secvit_t.py --workdir=WORKDIR \
      --config.data_dir=/path/to/coco --config.init_from=/path/to/secvit_t
"""

from configs import coco_retinanet_common


def get_config():
  return coco_retinanet_common.recipe('secvit_t')
