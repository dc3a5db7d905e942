"""Tests of the synthetic digit scenes of the dense demos, and of their one writer."""

import json
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_api
import pytest

from secvit_jax.data import digit_scenes
from secvit_jax.data import segmentation as segmentation_data


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
    np.testing.assert_array_equal(np.sum(scene.masks, axis=0), scene.labels > 0)
    for mask, (x0, y0, x1, y1), digit in zip(scene.masks, scene.boxes.astype(int),
                                             scene.classes):
      window = scene.labels[y0:y1, x0:x1]
      ink = window == 1 + digit
      # Tight: ink on every edge of the box; only this digit's label inside (no overlaps).
      assert ink[0].any() and ink[-1].any() and ink[:, 0].any() and ink[:, -1].any()
      assert set(np.unique(window)) <= {0, 1 + digit}
      np.testing.assert_array_equal(mask[y0:y1, x0:x1], ink)  # The instance mask: its ink.
      assert not mask.sum() - ink.sum()
      assert not covered[y0:y1, x0:x1].any()
      covered[y0:y1, x0:x1] = True
    assert not scene.labels[~covered].any()  # No labelled pixel outside the boxes.


SETTINGS = {'seed': 2, 'num_train': 3, 'num_val': 2, 'height': (30, 40), 'width': (36, 48),
            'digits': (1, 3), 'digit_sizes': (12, 20), 'image_format': 'png'}


def test_one_writer_gives_label_maps_boxes_and_masks_of_the_same_scenes(tmp_path):
  root = str(tmp_path / 'scenes')
  assert digit_scenes.write_scenes(root, SETTINGS) == root
  assert sorted(os.listdir(tmp_path)) == ['scenes']  # No staging folder left.
  assert sorted(os.listdir(root)) == ['annotations', 'images', 'scenes.json']
  listing = segmentation_data.list_segmentation_folder(
      os.path.join(root, 'images', 'validation'), os.path.join(root, 'annotations', 'validation'))
  assert listing.names == ('00000', '00001')
  with open(os.path.join(root, 'annotations', 'instances_validation.json')) as f:
    coco = json.load(f)
  assert [image['file_name'] for image in coco['images']] == ['00000.png', '00001.png']
  assert [c['id'] for c in coco['categories']] == list(range(1, 11))
  for image in coco['images']:
    labels = np.asarray(Image.open(listing.labels[image['id'] - 1]))
    pixels = np.asarray(Image.open(listing.images[image['id'] - 1]))
    assert pixels.shape == (image['height'], image['width'], 3) and labels.shape == pixels.shape[:2]
    assert 30 <= image['height'] <= 40 and 36 <= image['width'] <= 48
    union = np.zeros(labels.shape, bool)
    for ann in (a for a in coco['annotations'] if a['image_id'] == image['id']):
      assert isinstance(ann['segmentation']['counts'], str)
      mask = mask_api.decode({**ann['segmentation'],
                              'counts': ann['segmentation']['counts'].encode()}).astype(bool)
      assert (labels[mask] == ann['category_id']).all() and ann['area'] == mask.sum()
      rows, cols = np.nonzero(mask)
      assert ann['bbox'] == [cols.min(), rows.min(), cols.max() + 1 - cols.min(),
                             rows.max() + 1 - rows.min()]
      union |= mask
    np.testing.assert_array_equal(union, labels > 0)

  stamp = os.path.getmtime(os.path.join(root, 'scenes.json'))
  assert digit_scenes.write_scenes(root, dict(SETTINGS)) == root  # Present: reused, untouched.
  assert os.path.getmtime(os.path.join(root, 'scenes.json')) == stamp
  with pytest.raises(ValueError, match='holds digit scenes written with'):
    digit_scenes.write_scenes(root, dict(SETTINGS, num_train=4))
  (tmp_path / 'other').mkdir()
  (tmp_path / 'other' / 'file').write_text('x')
  with pytest.raises(ValueError, match='exists but holds no digit scenes'):
    digit_scenes.write_scenes(str(tmp_path / 'other'), SETTINGS)


def test_settings_are_checked_and_choose_the_folder_and_the_image_format(tmp_path):
  with pytest.raises(ValueError, match=r"lacks \['image_format'\]; unknown \['sizes'\]"):
    digit_scenes.check_settings({**{k: v for k, v in SETTINGS.items() if k != 'image_format'},
                                 'sizes': (1, 2)})
  with pytest.raises(ValueError, match="image_format must be one of \\['jpg', 'png'\\]"):
    digit_scenes.check_settings(dict(SETTINGS, image_format='gif'))
  jpeg = dict(SETTINGS, image_format='jpg', num_train=1, num_val=1, height=24, width=24)
  assert digit_scenes.default_dir(jpeg) != digit_scenes.default_dir(SETTINGS)
  root = digit_scenes.write_scenes(str(tmp_path / 'jpeg'), jpeg)
  assert os.listdir(os.path.join(root, 'images', 'training')) == ['00000.jpg']
  with Image.open(os.path.join(root, 'images', 'training', '00000.jpg')) as image:
    assert image.format == 'JPEG' and image.size == (24, 24)
