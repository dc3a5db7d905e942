"""Scenes of handwritten digits, the offline data of the dense-prediction demos and tests.

scikit-learn's 8×8 digits (the 'train' or 'test' split of `sources.digits_splits`, so held-out
scenes show held-out digits) are scaled up and pasted at random places of a canvas, without
overlapping, each in a colour of its own over a smooth background of random colours. Every ink
pixel is labelled with its digit, and every digit has its ink as its instance mask and the tight
box of its ink. A scene is a function of (seed, split, index) alone.

`write_scenes` writes a set of them once into a folder that every task reads, from the same
scenes: the segmentation 'folder' layout and the COCO layout side by side,

  ROOT/scenes.json                              the settings they were written with
  ROOT/images/{training,validation}/NNNNN.EXT   the scenes (EXT: the settings' image_format)
  ROOT/annotations/{training,validation}/NNNNN.png   label maps: 0 background, 1 + d digit d
  ROOT/annotations/instances_{training,validation}.json   COCO: boxes, and ink masks as RLE

Settings (`config.digit_scenes`), all required:
  seed          the scenes' seed.
  num_train     scenes of the 'training' split, drawn from the digits' 'train' split.
  num_val       scenes of the 'validation' split, drawn from the digits' held-out 'test' split.
  height, width a scene's size: pixels, or (min, max) inclusive ranges each scene's size is drawn
                in (from the seed and the split alone).
  digits        (min, max) digits per scene, inclusive; fewer when they do not fit.
  digit_sizes   (min, max) side in pixels of a pasted digit's 8×8 square, inclusive.
  image_format  'png' (lossless) or 'jpg' (quality 95).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping

from absl import logging
import numpy as np
from PIL import Image

from secvit_jax import files
from secvit_jax.data import sources
from secvit_jax.evaluation import coco

# A pasted digit's pixel is ink (labelled) where the scaled-up digit is at least this bright.
INK_LEVEL = 96


SETTINGS = ('seed', 'num_train', 'num_val', 'height', 'width', 'digits', 'digit_sizes',
            'image_format')
IMAGE_FORMATS = {'png': {}, 'jpg': {'quality': 95}}  # PIL's save options of each.
# Split -> (the digits' split drawn from, the split's seed offset).
SPLITS = {'training': ('train', 0), 'validation': ('test', 1)}
MANIFEST = 'scenes.json'
# The COCO layout of a scenes folder for `data.detection.CocoFolderSource`: split -> (image
# folder, annotation file), relative to ROOT.
COCO_LAYOUT = {'train': ('images/training', 'annotations/instances_training.json'),
               'val': ('images/validation', 'annotations/instances_validation.json')}
# Segmentation's classes: the background, then the ink of each digit.
SEGMENTATION_CLASSES = ('background',) + tuple(str(digit) for digit in range(10))


@dataclasses.dataclass(frozen=True)
class Scene:
  """image: uint8 (H, W, 3); labels: uint8 (H, W), 0 for the background and 1 + d on the ink of
  digit d; masks: bool (N, H, W), each digit's ink; boxes: float32 (N, 4), each digit's ink as
  (x0, y0, x1, y1) in pixels, x1 and y1 one past the last ink column and row; classes: int32 (N,),
  the digits."""
  image: np.ndarray
  labels: np.ndarray
  masks: np.ndarray
  boxes: np.ndarray
  classes: np.ndarray


def render_scene(seed: int, split: str, index: int, *, height: int, width: int,
                 digits: tuple[int, int] = (1, 4), sizes: tuple[int, int] = (16, 40)) -> Scene:
  """Scene `index` of `split` for `seed`.

  Args:
    seed: the dataset's seed.
    split: 'train' or 'test', the digits to draw from.
    index: the scene's number.
    height, width: the canvas.
    digits: (min, max) digits per scene, inclusive; fewer when they do not fit.
    sizes: (min, max) side in pixels of a pasted digit's 8×8 square, inclusive.
  """
  rng = np.random.default_rng([seed, ('train', 'test').index(split), index])
  images, labels = sources.digits_splits()[split]
  canvas = _background(rng, height, width)
  label_map = np.zeros((height, width), np.uint8)
  masks, boxes, classes, taken = [], [], [], []
  for _ in range(rng.integers(digits[0], digits[1] + 1)):
    size = int(rng.integers(sizes[0], min(sizes[1], height, width) + 1))
    for _ in range(20):  # Places tried before giving up on this digit.
      top = int(rng.integers(0, height - size + 1))
      left = int(rng.integers(0, width - size + 1))
      if all(top >= b or top + size <= t or left >= r or left + size <= l
             for t, l, b, r in taken):
        break
    else:
      continue
    taken.append((top, left, top + size, left + size))
    which = int(rng.integers(len(labels)))
    alpha = np.asarray(Image.fromarray(images[which]).resize((size, size), Image.BILINEAR))
    ink = alpha >= INK_LEVEL
    if not ink.any():
      continue
    colour = rng.integers(150, 256, 3)
    window = canvas[top:top + size, left:left + size]
    weight = (alpha / 255.0)[..., None]
    canvas[top:top + size, left:left + size] = window * (1 - weight) + colour * weight
    label_map[top:top + size, left:left + size][ink] = 1 + labels[which]
    masks.append(np.zeros((height, width), bool))
    masks[-1][top:top + size, left:left + size] = ink
    rows, cols = np.nonzero(ink)
    boxes.append((left + cols.min(), top + rows.min(), left + cols.max() + 1,
                  top + rows.max() + 1))
    classes.append(labels[which])
  return Scene(image=np.round(canvas).clip(0, 255).astype(np.uint8), labels=label_map,
               masks=np.asarray(masks, bool).reshape(-1, height, width),
               boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
               classes=np.asarray(classes, np.int32))


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """float64 (H, W, 3): a dim colour gradient with a little noise."""
  corners = rng.uniform(0, 110, (2, 2, 3))
  y = np.linspace(0, 1, height)[:, None, None]
  x = np.linspace(0, 1, width)[None, :, None]
  top = corners[0, 0] * (1 - x) + corners[0, 1] * x
  bottom = corners[1, 0] * (1 - x) + corners[1, 1] * x
  return top * (1 - y) + bottom * y + rng.normal(0, 6, (height, width, 3))


# ------------------------------------------------------------------------------------------------
# Scenes on disk.
# ------------------------------------------------------------------------------------------------


def check_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
  """`settings` as JSON values (lists for tuples), checked against the schema (module doc).

  Raises:
    ValueError: naming missing and unknown settings, or a bad image_format.
  """
  settings = {key: list(value) if isinstance(value, (tuple, list)) else value
              for key, value in dict(settings).items()}
  missing, unknown = sorted(set(SETTINGS) - set(settings)), sorted(set(settings) - set(SETTINGS))
  if missing or unknown:
    raise ValueError('config.digit_scenes: ' + '; '.join(
        ([f'lacks {missing}'] if missing else []) + ([f'unknown {unknown}'] if unknown else [])) +
        f' (settings: {", ".join(SETTINGS)})')
  if settings['image_format'] not in IMAGE_FORMATS:
    raise ValueError(f'config.digit_scenes.image_format must be one of {sorted(IMAGE_FORMATS)}, '
                     f'got {settings["image_format"]!r}')
  return settings


def default_dir(settings: Mapping[str, Any]) -> str:
  """~/.cache/secvit_jax/digit_scenes/<hash of the settings>: other settings, another folder."""
  text = json.dumps(check_settings(settings), sort_keys=True)
  return os.path.join(os.path.expanduser('~'), '.cache', 'secvit_jax', 'digit_scenes',
                      hashlib.sha256(text.encode()).hexdigest()[:12])


def write_scenes(root: str | None, settings: Mapping[str, Any]) -> str:
  """Makes sure `root` (None: `default_dir(settings)`) holds the scenes of `settings` in the
  layout of the module doc; returns it.

  Written once, into a staging folder beside `root` moved into place at the end (`files`), and
  reused when its manifest records the same settings; a process that finds another one's scenes
  arrived first keeps them.

  Raises:
    ValueError: `root` holds something else, or scenes of other settings (naming them).
  """
  settings = check_settings(settings)
  root = os.path.expanduser(root) if root else default_dir(settings)
  manifest = os.path.join(root, MANIFEST)
  if os.path.exists(manifest):
    with open(manifest) as f:
      written = json.load(f)
    if written != settings:
      raise ValueError(f'{root} holds digit scenes written with {written}, not {settings}: delete '
                       'it or point config.data_dir elsewhere')
    return root
  if os.path.exists(root) and os.listdir(root):
    raise ValueError(f'{root} exists but holds no digit scenes ({MANIFEST}); point '
                     'config.data_dir at another folder')
  logging.info('writing the digit scenes to %s: %s', root, settings)
  os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
  if os.path.isdir(root):
    os.rmdir(root)  # Empty (checked above).
  try:
    with files.staged(root, replace=False) as staging:
      for split in SPLITS:
        _write_split(os.fspath(staging), split, settings)
      (staging / MANIFEST).write_text(json.dumps(settings))
  except FileExistsError:  # Another process wrote them first.
    if not os.path.exists(manifest):
      raise
  return root


def _write_split(root: str, split: str, settings: dict[str, Any]) -> None:
  """Renders a split's scenes into `root`: images, label maps and the COCO annotations."""
  digits_split, offset = SPLITS[split]
  count = settings['num_train' if split == 'training' else 'num_val']
  extension = settings['image_format']
  for folder in ('images', 'annotations'):
    os.makedirs(os.path.join(root, folder, split))
  sizes = np.random.default_rng([settings['seed'], offset])
  images, annotations = [], []
  for index in range(count):
    height, width = (int(sizes.integers(side[0], side[1] + 1)) if isinstance(side, list)
                     else int(side) for side in (settings['height'], settings['width']))
    scene = render_scene(settings['seed'], digits_split, index, height=height, width=width,
                         digits=tuple(settings['digits']), sizes=tuple(settings['digit_sizes']))
    name = f'{index:05d}'
    Image.fromarray(scene.image).save(
        os.path.join(root, 'images', split, f'{name}.{extension}'), **IMAGE_FORMATS[extension])
    Image.fromarray(scene.labels).save(os.path.join(root, 'annotations', split, f'{name}.png'))
    image_id = index + 1
    images.append({'id': image_id, 'file_name': f'{name}.{extension}', 'height': height,
                   'width': width})
    for mask, (x0, y0, x1, y1), digit in zip(scene.masks, scene.boxes.tolist(),
                                             scene.classes.tolist()):
      annotations.append({
          'id': len(annotations) + 1, 'image_id': image_id, 'category_id': digit + 1,
          'bbox': [x0, y0, x1 - x0, y1 - y0], 'area': int(mask.sum()), 'iscrowd': 0,
          'segmentation': coco.encode_mask(mask)})
  dataset = {'images': images, 'annotations': annotations,
             'categories': [{'id': d + 1, 'name': str(d), 'supercategory': 'digit'}
                            for d in range(10)]}
  with open(os.path.join(root, 'annotations', f'instances_{split}.json'), 'w') as f:
    json.dump(dataset, f)
