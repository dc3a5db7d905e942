r"""SecViT-B with Semantic FPN on ADE20K: 80k iterations at batch 16 (see ade20k_common.py).

  python train.py --config=configs/ade20k_fpn_secvit_b.py --workdir=WORKDIR \
      --config.data_dir=/data/ADEChallengeData2016 --config.init_from=converted/secvit_b
"""

from configs import ade20k_common


def get_config():
  return ade20k_common.recipe('secvit_b', 'semantic_fpn')
