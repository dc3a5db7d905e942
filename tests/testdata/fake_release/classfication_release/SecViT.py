"""A stand-in for the release's SecViT.py in tests (no release code): the same imports, a tiny
torch model under the release's model function name, with stochastic depth and BatchNorm."""
import torch
import torch.nn as nn
from timm.models.layers import DropPath, to_2tuple, trunc_normal_
from timm.models.registry import register_model
from timm.models.vision_transformer import _cfg
from fvcore.nn import FlopCountAnalysis, flop_count_table
from einops import rearrange


class Tiny(nn.Module):

  def __init__(self, num_classes=1000):
    super().__init__()
    self.conv = nn.Conv2d(3, 8, 3, 2, 1)
    self.norm = nn.BatchNorm2d(8)
    self.drop_path = DropPath(0.5)
    self.head = nn.Linear(8, num_classes)
    trunc_normal_(self.head.weight, std=0.02)

  def forward(self, x):
    x = self.norm(self.conv(x))
    x = x + self.drop_path(x)
    return self.head(rearrange(x, 'b c h w -> b (h w) c').mean(1))


@register_model
def KClusterFormerSimpleNew_T(args):
  model = Tiny()
  model.default_cfg = _cfg()
  return model
