"""Stand-ins for timm.models.layers: DropPath, to_2tuple, trunc_normal_ (as timm defines them)."""

from __future__ import annotations

import torch
from torch import nn


class DropPath(nn.Module):
  """Stochastic depth per sample: in training, each sample's residual branch is zeroed with
  probability `drop_prob` and the kept ones are scaled by 1 / (1 - drop_prob), as timm's."""

  def __init__(self, drop_prob: float = 0.0):
    super().__init__()
    self.drop_prob = float(drop_prob)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if not self.training or self.drop_prob == 0.0:
      return x
    keep = 1.0 - self.drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


def to_2tuple(value):
  """(value, value) for a scalar; an iterable is returned as a tuple."""
  if isinstance(value, (tuple, list)):
    return tuple(value)
  return (value, value)


def trunc_normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0,
                  b: float = 2.0) -> torch.Tensor:
  """Normal(mean, std) truncated to [a, b], in place (timm's signature, torch's sampler)."""
  return nn.init.trunc_normal_(tensor, mean=mean, std=std, a=a, b=b)
