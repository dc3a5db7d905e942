r"""SecViT-B with UperNet on ADE20K: 160k iterations at batch 16 (see ade20k_common.py).

  python train.py --config=configs/ade20k_upernet_secvit_b.py --workdir=WORKDIR \
      --config.data_dir=/data/ADEChallengeData2016 --config.init_from=converted/secvit_b
"""

from configs import ade20k_common


def get_config():
  return ade20k_common.recipe('secvit_b', 'upernet')
