r"""SecViT-T on ImageNet-1k with the release's recipe (300 epochs, global batch 1024).

  python train.py --config=configs/secvit_t.py --workdir=WORKDIR \
      --config.data_dir=gs://BUCKET/tensorflow_datasets
"""

from configs import common


def get_config():
  return common.recipe('secvit_t')
