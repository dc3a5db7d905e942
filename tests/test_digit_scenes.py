"""Tests of the synthetic digit scenes of the dense demos."""

import numpy as np

from secvit_jax.data import digit_scenes


def test_scenes_are_deterministic_and_vary():
  first = digit_scenes.render_scene(0, 'train', 3, height=64, width=80)
  again = digit_scenes.render_scene(0, 'train', 3, height=64, width=80)
  other = digit_scenes.render_scene(0, 'train', 4, height=64, width=80)
  np.testing.assert_array_equal(first.image, again.image)
  np.testing.assert_array_equal(first.labels, again.labels)
  assert first.image.shape == (64, 80, 3) and first.image.dtype == np.uint8
  assert not np.array_equal(first.image, other.image)
  assert not np.array_equal(first.image,
                            digit_scenes.render_scene(0, 'test', 3, height=64, width=80).image)


def test_boxes_are_the_tight_boxes_of_each_digits_labelled_ink():
  for index in range(20):
    scene = digit_scenes.render_scene(1, 'test', index, height=96, width=96, digits=(2, 4))
    assert len(scene.boxes) == len(scene.classes) >= 1
    covered = np.zeros(scene.labels.shape, bool)
    for (x0, y0, x1, y1), digit in zip(scene.boxes.astype(int), scene.classes):
      window = scene.labels[y0:y1, x0:x1]
      ink = window == 1 + digit
      # Tight: ink on every edge of the box; only this digit's label inside (no overlaps).
      assert ink[0].any() and ink[-1].any() and ink[:, 0].any() and ink[:, -1].any()
      assert set(np.unique(window)) <= {0, 1 + digit}
      assert not covered[y0:y1, x0:x1].any()
      covered[y0:y1, x0:x1] = True
    assert not scene.labels[~covered].any()  # No labelled pixel outside the boxes.
