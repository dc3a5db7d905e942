r"""SecViT-L with Semantic FPN on ADE20K: 80k iterations at batch 16 (see ade20k_common.py).

  python train.py --config=configs/ade20k_fpn_secvit_l.py --workdir=WORKDIR \
      --config.data_dir=/data/ADEChallengeData2016 --config.init_from=converted/secvit_l
"""

from configs import ade20k_common


def get_config():
  return ade20k_common.recipe('secvit_l', 'semantic_fpn')
