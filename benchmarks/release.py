"""The release's PyTorch model and a train step as its recipe runs it, for side-by-side benchmarks.

The release's code is never copied here: `import_release_model(path)` imports
`classfication_release/SecViT.py` from a checkout of the release repository the user names. That
file imports timm, fvcore and einops; where timm or fvcore is absent, the stand-ins in
`benchmarks/release_standins/` (the few names it imports) are put at the end of `sys.path`, so
torch and einops suffice and a real installation always wins.

The train step is the release's `engine.train_one_epoch` body: timm's Mixup/CutMix in 'batch'
mode (written here in torch, as `secvit_jax/mixup.py` is in JAX), the model in train mode,
soft-target cross-entropy, `torch.optim.AdamW` with timm's weight-decay groups (no decay on
biases and 1-D tensors), then an EMA of the model's state dict.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
from typing import Any

import numpy as np

STANDINS = pathlib.Path(__file__).with_name('release_standins')
# Our variant names -> the release's model functions (its 'M' is our 'b').
RELEASE_MODELS = {'secvit_t': 'KClusterFormerSimpleNew_T', 'secvit_s': 'KClusterFormerSimpleNew_S',
                  'secvit_b': 'KClusterFormerSimpleNew_M', 'secvit_l': 'KClusterFormerSimpleNew_L'}
MODEL_FILE = os.path.join('classfication_release', 'SecViT.py')


def import_release_model(checkout: str):
  """The module `classfication_release/SecViT.py` of the release checkout at `checkout`.

  Raises:
    FileNotFoundError: `checkout` has no classfication_release/SecViT.py.
    ImportError: torch or einops is missing.
  """
  path = os.path.join(checkout, MODEL_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--release {checkout}: no {MODEL_FILE} there (give the root of a '
                            'checkout of the release repository)')
  for needed in ('torch', 'einops'):
    if importlib.util.find_spec(needed) is None:
      raise ImportError(f'the release model needs {needed} (pip install -r requirements-dev.txt)')
  if any(importlib.util.find_spec(name) is None for name in ('timm', 'fvcore')):
    if str(STANDINS) not in sys.path:
      sys.path.append(str(STANDINS))
  spec = importlib.util.spec_from_file_location('release_secvit', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def create_release_model(checkout: str, variant: str):
  """The release's torch model for our variant name (randomly initialized as the release does)."""
  if variant not in RELEASE_MODELS:
    raise ValueError(f'no release model for {variant!r}; choose one of {sorted(RELEASE_MODELS)}')
  return getattr(import_release_model(checkout), RELEASE_MODELS[variant])(None)


def mix_batch(images, labels, *, num_classes: int, mixup_alpha: float, cutmix_alpha: float,
              switch_prob: float, label_smoothing: float, rng: np.random.Generator):
  """timm's `Mixup` in 'batch' mode (mix probability 1), in torch, in place on `images`.

  Args:
    images: float (B, C, H, W); mixed in place with the batch reversed.
    labels: int64 (B,).

  Returns:
    (images, soft targets float32 (B, num_classes)).
  """
  import torch  # pylint: disable=g-import-not-at-top
  off = label_smoothing / num_classes
  one_hot = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32,
                       device=images.device)
  one_hot.scatter_(1, labels[:, None], 1.0 - label_smoothing + off)
  use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
  alpha = cutmix_alpha if use_cutmix else mixup_alpha
  lam = float(rng.beta(alpha, alpha))
  if use_cutmix:
    height, width = images.shape[-2:]
    cut = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    center_y, center_x = rng.integers(0, height), rng.integers(0, width)
    top, bottom = (int(np.clip(center_y + d, 0, height)) for d in (-(cut_h // 2), cut_h // 2))
    left, right = (int(np.clip(center_x + d, 0, width)) for d in (-(cut_w // 2), cut_w // 2))
    images[:, :, top:bottom, left:right] = images.flip(0)[:, :, top:bottom, left:right]
    lam = 1.0 - (bottom - top) * (right - left) / (height * width)
  else:
    reversed_part = images.flip(0).mul_(1.0 - lam)
    images.mul_(lam).add_(reversed_part)
  return images, one_hot * lam + one_hot.flip(0) * (1.0 - lam)


class ReleaseTrainStep:
  """One training step of the release's recipe on its torch model, on the model's device.

  `__call__(images (B, C, H, W), labels (B,))` mixes the batch, runs forward and backward with
  stochastic depth, steps AdamW and updates the EMA; returns the loss as a Python float (the
  release reads it every step). `mixing` holds `mix_batch`'s keyword arguments (num_classes,
  alphas, switch_prob, label_smoothing). `amp_dtype` None computes in float32; torch.float16 or
  torch.bfloat16 runs forward and loss under `torch.autocast` (CUDA), float16 with a GradScaler,
  as the release trains on GPUs.
  """

  def __init__(self, model, *, batch_size: int, mixing: dict[str, Any], amp_dtype=None,
               base_lr: float = 5e-4, weight_decay: float = 0.05, ema_decay: float = 0.99996,
               seed: int = 0):
    import copy  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    self._torch = torch
    self.model = model.train()
    decayed, undecayed = [], []
    for name, param in model.named_parameters():
      (undecayed if param.ndim <= 1 or name.endswith('.bias') else decayed).append(param)
    self.optimizer = torch.optim.AdamW(
        [{'params': decayed, 'weight_decay': weight_decay},
         {'params': undecayed, 'weight_decay': 0.0}],
        lr=base_lr * batch_size / 512, betas=(0.9, 0.999), eps=1e-8)
    self.ema = copy.deepcopy(model).eval()
    for param in self.ema.parameters():
      param.requires_grad_(False)
    self._ema_decay = ema_decay ** (batch_size / 512)
    self._mixing = dict(mixing)
    self._amp_dtype = amp_dtype
    self._scaler = torch.amp.GradScaler('cuda') if amp_dtype == torch.float16 else None
    self._rng = np.random.default_rng(seed)

  def __call__(self, images, labels) -> float:
    torch = self._torch
    images, targets = mix_batch(images.clone(), labels, rng=self._rng, **self._mixing)
    with torch.autocast(images.device.type, dtype=self._amp_dtype,
                        enabled=self._amp_dtype is not None):
      logits = self.model(images)
      loss = torch.sum(-targets * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    loss_value = loss.item()
    self.optimizer.zero_grad()
    if self._scaler is None:
      loss.backward()
      self.optimizer.step()
    else:
      self._scaler.scale(loss).backward()
      self._scaler.step(self.optimizer)
      self._scaler.update()
    self._update_ema()
    return loss_value

  def _update_ema(self) -> None:
    """ema <- decay·ema + (1 - decay)·model over the state dict (parameters and BatchNorm
    statistics), as timm's ModelEma; in place and batched, so at most as slow as timm's."""
    torch = self._torch
    with torch.no_grad():
      current = self.model.state_dict()
      pairs = [(ema, current[name]) for name, ema in self.ema.state_dict().items()]
      floats = [(ema, value) for ema, value in pairs if ema.is_floating_point()]
      torch._foreach_lerp_([ema for ema, _ in floats],  # pylint: disable=protected-access
                           [value for _, value in floats], 1.0 - self._ema_decay)
      for ema, value in pairs:
        if not ema.is_floating_point():  # num_batches_tracked: the model's count.
          ema.copy_(value)
