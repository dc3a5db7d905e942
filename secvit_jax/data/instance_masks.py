"""Instance masks of COCO annotations, for Mask R-CNN's training batches.

An annotation's 'segmentation' is one of COCO's three forms: a polygon (a list of parts, each a
flat list x0, y0, x1, y1, ... in the image's pixels; the parts are merged), an uncompressed RLE
({'size': [height, width], 'counts': [run lengths, from a run of 0s, column-major]}) or a
compressed RLE (the same with 'counts' a string, pycocotools' encoding). `check_segmentation`
finds what makes one undecodable (cheaply: no bitmap is made, so a whole split is checked when it
is listed); `decode_segmentation` makes the bitmap with pycocotools; `instance_crops` gives each
instance's fixed-size crop over its box (`detection.masks.crop_masks_to_boxes`), the form in which
masks travel with the image (`data.detection`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from pycocotools import mask as mask_api

from secvit_jax.detection import masks as masks_lib

# Polygon parts with fewer numbers (under 3 points) enclose nothing and are left out, as
# detectron2 leaves them out (pycocotools would read a part of 4 numbers as a box).
MIN_POLYGON_NUMBERS = 6
# Pixels of the bitmap kept around a box when it is cropped: bilinear samples inside the box reach
# at most one pixel beyond it.
CROP_MARGIN = 2


def _rle_string_counts(counts: str) -> list[int]:
  """The run lengths of a compressed RLE string (pycocotools' encoding: 5 bits per character
  offset by 48, bit 0x20 continues a number, bit 0x10 of its last character its sign; from the
  third run on, each number is the difference to the run two before)."""
  runs = []
  position = 0
  while position < len(counts):
    value, shift, more = 0, 0, True
    while more:
      if position == len(counts):
        raise ValueError('its RLE string ends inside a run length')
      code = ord(counts[position]) - 48
      if not 0 <= code < 64:
        raise ValueError(f'its RLE string has a character outside pycocotools\' encoding '
                         f'({counts[position]!r})')
      value |= (code & 0x1f) << shift
      more = bool(code & 0x20)
      position += 1
      shift += 5
      if not more and code & 0x10:
        value |= -1 << shift
    if len(runs) > 2:
      value += runs[-2]
    runs.append(value)
  return runs


def check_segmentation(segmentation: Any, height: int, width: int) -> str | None:
  """Why `segmentation` (see the module docstring) cannot be decoded into a bitmap of an image of
  `height` × `width` pixels, or None when it can."""
  if isinstance(segmentation, list):
    parts = [part for part in segmentation if isinstance(part, list)]
    if len(parts) != len(segmentation) or not parts:
      return 'its polygon is not a non-empty list of parts, each a list of numbers'
    for part in parts:
      try:
        numbers = np.asarray(part, np.float64)
      except (TypeError, ValueError):
        return 'its polygon has a part that is not a list of numbers'
      if numbers.ndim != 1 or len(part) % 2 or not np.isfinite(numbers).all():
        return 'its polygon has a part that is not an even count of finite numbers'
    if max(len(part) for part in parts) < MIN_POLYGON_NUMBERS:
      return 'its polygon has no part of 3 or more points'
    return None
  if not isinstance(segmentation, dict) or not {'size', 'counts'} <= set(segmentation):
    return 'its segmentation is neither a polygon (list) nor an RLE (dict with size and counts)'
  size, counts = segmentation['size'], segmentation['counts']
  if not isinstance(size, list) or size != [height, width]:
    return f'its RLE size is {size}, the image is [{height}, {width}]'
  if isinstance(counts, str):
    try:
      runs = _rle_string_counts(counts)
    except ValueError as error:
      return str(error)
  elif isinstance(counts, list) and all(isinstance(run, int) for run in counts):
    runs = counts
  else:
    return 'its RLE counts are neither a string nor a list of integers'
  if min(runs, default=0) < 0 or sum(runs) != height * width:
    return (f'its RLE run lengths sum to {sum(runs)} (or are negative), not height × width = '
            f'{height * width}')
  return None


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
  """bool (height, width): the bitmap of a segmentation that `check_segmentation` accepts."""
  if isinstance(segmentation, list):
    parts = [part for part in segmentation if len(part) >= MIN_POLYGON_NUMBERS]
    rle = mask_api.merge(mask_api.frPyObjects(parts, height, width))
  elif isinstance(segmentation['counts'], list):
    rle = mask_api.frPyObjects(segmentation, height, width)
  else:
    rle = {'size': [height, width], 'counts': segmentation['counts'].encode('ascii')}
  return mask_api.decode(rle).astype(bool)


def instance_crops(segmentations: Sequence[Any], boxes: np.ndarray, height: int, width: int,
                   size: int) -> np.ndarray:
  """uint8 (n, size, size): each instance's bitmap cropped over its box
  (`detection.masks.crop_masks_to_boxes`); an instance without a segmentation (None: a crowd,
  never a mask target) is all zeros.

  Args:
    segmentations: n segmentations that `check_segmentation` accepts, or None.
    boxes: float (n, 4) (x0, y0, x1, y1) in the image's pixels; each crop covers its box clipped
      to the image, as the training transform clips it.
    height, width: the image's size.
    size: the crops' side.
  """
  crops = np.zeros((len(segmentations), size, size), np.uint8)
  for i, segmentation in enumerate(segmentations):
    if segmentation is None:
      continue
    bitmap = decode_segmentation(segmentation, height, width)
    x0, y0, x1, y1 = np.clip(np.asarray(boxes[i], np.float64), 0, [width, height] * 2)
    # Only the box and a margin of the bitmap (pixel offsets (left, top)) are resampled.
    left, top = max(int(np.floor(x0)) - CROP_MARGIN, 0), max(int(np.floor(y0)) - CROP_MARGIN, 0)
    right = min(int(np.ceil(x1)) + CROP_MARGIN, width)
    bottom = min(int(np.ceil(y1)) + CROP_MARGIN, height)
    region = bitmap[top:bottom, left:right]
    box = np.asarray([[x0 - left, y0 - top, x1 - left, y1 - top]], np.float32)
    crops[i] = masks_lib.crop_masks_to_boxes(region[None], box, size)[0]
  return crops
