"""Mixup and CutMix on device, in pure JAX: timm's `Mixup` in 'batch' mode, as the release trains.

One λ per batch; every image is mixed with the image at the mirrored position of the batch (the
batch reversed). With both Mixup and CutMix on, each batch uses CutMix with probability
`switch_prob`, else Mixup. Mixup: x ← λ x + (1 - λ) x_rev, λ ~ Beta(mixup_alpha, mixup_alpha).
CutMix: a box of relative area about 1 - λ, λ ~ Beta(cutmix_alpha, cutmix_alpha), centred
uniformly and clipped to the image, is pasted from x_rev, and λ becomes the share of the image
left unchanged. The targets are label-smoothed one-hots mixed with the same λ:
y ← λ y + (1 - λ) y_rev.

Called inside the jitted training step; with the batch sharded over devices, the reversal moves
images between devices (XLA inserts the collective).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_one_hot(labels: jax.Array, num_classes: int, label_smoothing: float) -> jax.Array:
  """int (B,) -> float32 (B, num_classes): 1 - ε + ε/K on the label, ε/K elsewhere (sums to 1)."""
  off = label_smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - label_smoothing) + off


def _cutmix_keep_mask(rng: jax.Array, lam: jax.Array, height: int,
                      width: int) -> tuple[jax.Array, jax.Array]:
  """timm's `rand_bbox` and λ correction.

  The box has sides int(H √(1-λ)) × int(W √(1-λ)), its centre uniform over the pixels, its ends
  clipped to the image.

  Returns:
    keep: float32 (H, W), 0 inside the box, 1 outside.
    lam: float32 scalar, the fraction of pixels outside the box.
  """
  rng_y, rng_x = jax.random.split(rng)
  cut = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * cut).astype(jnp.int32)
  cut_w = jnp.floor(width * cut).astype(jnp.int32)
  center_y = jax.random.randint(rng_y, (), 0, height)
  center_x = jax.random.randint(rng_x, (), 0, width)
  top, bottom = (jnp.clip(center_y + d, 0, height) for d in (-(cut_h // 2), cut_h // 2))
  left, right = (jnp.clip(center_x + d, 0, width) for d in (-(cut_w // 2), cut_w // 2))
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  area = (bottom - top) * (right - left)
  return 1.0 - inside.astype(jnp.float32), 1.0 - area / (height * width)


def mix_batch(rng: jax.Array, images: jax.Array, labels: jax.Array, *, num_classes: int,
              mixup_alpha: float, cutmix_alpha: float, switch_prob: float,
              label_smoothing: float) -> tuple[jax.Array, jax.Array]:
  """Mixes a training batch with its reverse by Mixup or CutMix; soft targets.

  Args:
    rng: a JAX PRNG key; the mixing is a function of it.
    images: (B, H, W, C) NHWC, any float dtype (kept).
    labels: int (B,) class indices.
    num_classes: K.
    mixup_alpha, cutmix_alpha: Beta parameters; 0 turns that method off.
    switch_prob: probability of CutMix on a batch when both are on.
    label_smoothing: ε of the targets.

  Returns:
    (images (B, H, W, C) in the input dtype, targets float32 (B, K), each row summing to 1). With
    both alphas 0: the images unchanged and label-smoothed one-hots.
  """
  targets = smooth_one_hot(labels, num_classes, label_smoothing)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets
  rng_switch, rng_lam, rng_box = jax.random.split(rng, 3)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(rng_switch) < switch_prob
    alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
    alpha = jnp.asarray(max(mixup_alpha, cutmix_alpha), jnp.float32)
  lam = jax.random.beta(rng_lam, alpha, alpha)
  height, width = images.shape[1:3]
  keep, cutmix_lam = _cutmix_keep_mask(rng_box, lam, height, width)
  # Weight of each image's own pixels: the box mask for CutMix, λ everywhere for Mixup.
  weight = jnp.where(use_cutmix, keep, lam)[None, :, :, None].astype(images.dtype)
  lam = jnp.where(use_cutmix, cutmix_lam, lam)
  mixed = weight * images + (1 - weight) * images[::-1]
  return mixed, lam * targets + (1.0 - lam) * targets[::-1]
