"""Tests of on-device Mixup/CutMix: what each mode does to the pixels and the label mass."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from secvit_jax import mixup

NUM_CLASSES = 5
SMOOTHING = 0.1


@pytest.fixture(scope='module')
def batch():
  images = jax.random.normal(jax.random.key(0), (6, 16, 24, 3))
  labels = jnp.array([0, 1, 2, 3, 4, 1])
  return images, labels


def mix(rng, images, labels, mixup_alpha, cutmix_alpha, switch_prob=0.5):
  return mixup.mix_batch(rng, images, labels, num_classes=NUM_CLASSES, mixup_alpha=mixup_alpha,
                         cutmix_alpha=cutmix_alpha, switch_prob=switch_prob,
                         label_smoothing=SMOOTHING)


def own_weight(targets, labels):
  """λ recovered from the targets: the mass on each row's own label, less smoothing."""
  smooth = np.asarray(mixup.smooth_one_hot(labels, NUM_CLASSES, SMOOTHING))
  own = smooth[np.arange(len(labels)), labels]
  other = smooth[np.arange(len(labels)), labels[::-1]]
  # Row 0 and its mirror row have different labels (0 and 1).
  got = np.asarray(targets)[0, labels[0]]
  return float((got - other[0]) / (own[0] - other[0]))


def test_smoothed_one_hot_mass():
  targets = np.asarray(mixup.smooth_one_hot(jnp.array([0, 3]), NUM_CLASSES, SMOOTHING))
  np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(targets[0], [0.92, 0.02, 0.02, 0.02, 0.02], rtol=1e-6)


def test_no_mixing_returns_images_unchanged(batch):
  images, labels = batch
  out, targets = mix(jax.random.key(1), images, labels, 0.0, 0.0)
  np.testing.assert_array_equal(out, images)
  np.testing.assert_allclose(targets, mixup.smooth_one_hot(labels, NUM_CLASSES, SMOOTHING))


def test_mixup_blends_with_the_reversed_batch(batch):
  images, labels = batch
  for seed in range(5):
    out, targets = mix(jax.random.key(seed), images, labels, 0.8, 0.0)
    lam = own_weight(targets, np.asarray(labels))
    assert 0.0 <= lam <= 1.0
    np.testing.assert_allclose(out, lam * images + (1 - lam) * images[::-1], atol=1e-5)
    np.testing.assert_allclose(np.sum(targets, axis=1), 1.0, rtol=1e-6)


def test_cutmix_pastes_one_box_from_the_reversed_batch(batch):
  images, labels = batch
  pasted_fractions = []
  for seed in range(8):
    out, targets = mix(jax.random.key(seed), images, labels, 0.0, 1.0)
    out, images_np, reverse = np.asarray(out), np.asarray(images), np.asarray(images[::-1])
    from_self = np.all(out == images_np, axis=-1)
    from_reverse = np.all(out == reverse, axis=-1)
    assert np.all(from_self | from_reverse)  # Every pixel is copied, none blended.
    pasted = ~from_self[0]
    # The same box in every image; a rectangle.
    for i in range(len(out)):
      np.testing.assert_array_equal(~from_self[i], pasted)
    if pasted.any():
      rows, cols = np.nonzero(pasted)
      assert pasted[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    # λ is corrected to the box actually pasted (after clipping to the image).
    lam = own_weight(targets, np.asarray(labels))
    assert lam == pytest.approx(1.0 - pasted.mean(), abs=1e-6)
    np.testing.assert_allclose(np.sum(targets, axis=1), 1.0, rtol=1e-6)
    pasted_fractions.append(pasted.mean())
  assert max(pasted_fractions) > 0


def test_switch_probability_and_determinism(batch):
  images, labels = batch
  mixed = jax.jit(functools.partial(mix, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5))
  cutmix_batches = 0
  for seed in range(60):
    out, targets = mixed(jax.random.key(seed), images, labels)
    copied = np.all((np.asarray(out) == np.asarray(images))
                    | (np.asarray(out) == np.asarray(images[::-1])))
    cutmix_batches += int(copied)
    np.testing.assert_allclose(np.sum(targets, axis=1), 1.0, rtol=1e-5)
  assert 15 <= cutmix_batches <= 45  # Binomial(60, 0.5): mean 30, std 3.9.
  first = mixed(jax.random.key(3), images, labels)
  again = mixed(jax.random.key(3), images, labels)
  np.testing.assert_array_equal(first[0], again[0])
  np.testing.assert_array_equal(first[1], again[1])


def test_keeps_the_image_dtype(batch):
  images, labels = batch
  out, targets = mix(jax.random.key(0), images.astype(jnp.bfloat16), labels, 0.8, 1.0)
  assert out.dtype == jnp.bfloat16 and targets.dtype == jnp.float32
