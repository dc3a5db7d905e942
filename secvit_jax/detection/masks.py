"""Instance masks for Mask R-CNN: ground-truth bitmaps cropped to their boxes on the host, the
mask head's training targets resampled from those crops on the device, and predicted masks pasted
back into an image on the host.

Coordinates are pixels with pixel (r, c) covering [c, c + 1) × [r, r + 1), its centre at
(c + 0.5, r + 0.5); a box is (x0, y0, x1, y1) in those pixels. Sampling a grid of M × M bins over
a box takes bin (i, j) at the bin's centre (x0 + (j + 0.5)(x1 - x0) / M, y0 + (i + 0.5)(y1 - y0)
/ M), read bilinearly between the centres of the cells around it.

Full-resolution masks are too big for a device batch (100 instances of 1344² are 180 MB as
uint8), so, as the TPU implementations of Mask R-CNN do, the input pipeline keeps each instance
as an M × M crop of its own box (`crop_masks_to_boxes`, M = 112) and `mask_targets` resamples an
RoI's 28 × 28 target inside its ground truth's crop. mmdet instead RoIAligns the full bitmap by
the RoI (adaptive sampling); the crop's resolution makes the two differ only along the mask's
outline.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _bin_centres(boxes: np.ndarray | jax.Array, size: int, xp=np):
  """Bin centres of a size × size grid over each box: boxes (..., 4) -> (xs (..., size),
  ys (..., size)) in pixels."""
  steps = (xp.arange(size, dtype=boxes.dtype) + 0.5) / size
  xs = boxes[..., 0:1] + steps * (boxes[..., 2:3] - boxes[..., 0:1])
  ys = boxes[..., 1:2] + steps * (boxes[..., 3:4] - boxes[..., 1:2])
  return xs, ys


def _linear_taps(coords: np.ndarray, length: int):
  """The two cells and the weight of the second for samples at cell coordinates `coords`
  (cell k's centre at k), clamped to the axis' end cells: -> (low int, high int, fraction)."""
  coords = np.clip(coords, 0, length - 1)
  low = np.floor(coords).astype(np.int64)
  return low, np.minimum(low + 1, length - 1), (coords - low).astype(np.float32)


def crop_masks_to_boxes(masks: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
  """Each instance's bitmap sampled over exactly its box (NumPy, for the input pipeline).

  Bin (r, c) of crop n is instance n's bitmap read bilinearly at the bin's centre (cells read as
  their value over the whole pixel up to the image's edge; outside the image 0), thresholded
  >= 0.5. The crop is box-relative: scaling the image and its boxes leaves it unchanged, and a
  horizontal flip of both mirrors it (`crop[:, ::-1]`).

  Args:
    masks: bool or {0, 1} (N, H, W), the instances' bitmaps over the whole image.
    boxes: float (N, 4) (x0, y0, x1, y1) in the bitmaps' pixels.
    size: M, the side of a crop.

  Returns:
    uint8 (N, M, M) in {0, 1}.
  """
  masks, boxes = np.asarray(masks), np.asarray(boxes, np.float64)
  if masks.ndim != 3:
    raise ValueError(f'masks must be (N, H, W), got shape {masks.shape}')
  if boxes.shape != (masks.shape[0], 4):
    raise ValueError(f'boxes must be ({masks.shape[0]}, 4) for {masks.shape[0]} masks, got '
                     f'{boxes.shape}')
  if size < 1:
    raise ValueError(f'size must be positive, got {size}')
  _, height, width = masks.shape
  xs, ys = _bin_centres(boxes, size)
  inside = (((ys >= 0) & (ys <= height))[:, :, None]
            & ((xs >= 0) & (xs <= width))[:, None, :])  # (N, M, M)
  x_low, x_high, fx = _linear_taps(xs - 0.5, width)
  y_low, y_high, fy = _linear_taps(ys - 0.5, height)
  instance = np.arange(masks.shape[0])[:, None, None]

  def read(rows, cols):
    return masks[instance, rows[:, :, None], cols[:, None, :]].astype(np.float32)

  fx, fy = fx[:, None, :], fy[:, :, None]
  top = read(y_low, x_low) * (1 - fx) + read(y_low, x_high) * fx
  bottom = read(y_high, x_low) * (1 - fx) + read(y_high, x_high) * fx
  value = top * (1 - fy) + bottom * fy
  return ((value >= 0.5) & inside).astype(np.uint8)


def paste_masks(mask_probs: np.ndarray, boxes: np.ndarray, height: int, width: int,
                threshold: float = 0.5) -> np.ndarray:
  """Predicted masks pasted into an image (NumPy, on the host), as mmdet's `_do_paste_mask`.

  Every pixel whose centre lies in detection d's box reads d's m × m mask bilinearly at that
  centre, the mask's bins spanning the box and zeros beyond its outer bins' centres (PyTorch's
  `grid_sample`, align_corners=False, zero padding, so even a mask of ones fades to a quarter at
  the box's very corners); pixels outside the box are 0. Only each box's
  window of pixels is computed, as two small matrix products (rows × mask × columns).

  Args:
    mask_probs: float (D, m, m), mask probabilities over each detection's box.
    boxes: float (D, 4) (x0, y0, x1, y1) in the target image's pixels.
    height, width: the target image's size.
    threshold: a pixel is in the mask when its value is >= this.

  Returns:
    bool (D, height, width).
  """
  mask_probs, boxes = np.asarray(mask_probs, np.float32), np.asarray(boxes, np.float64)
  if mask_probs.ndim != 3 or mask_probs.shape[1] != mask_probs.shape[2]:
    raise ValueError(f'mask_probs must be (D, m, m), got shape {mask_probs.shape}')
  if boxes.shape != (mask_probs.shape[0], 4):
    raise ValueError(f'boxes must be ({mask_probs.shape[0]}, 4) for {mask_probs.shape[0]} '
                     f'masks, got {boxes.shape}')
  size = mask_probs.shape[1]
  pasted = np.zeros((mask_probs.shape[0], height, width), bool)
  # The first and last pixel whose centre is in the box, per axis, clipped to the image.
  first = np.clip(np.ceil(boxes[:, :2] - 0.5), 0, [width, height]).astype(np.int64)
  last = np.clip(np.floor(boxes[:, 2:] - 0.5), -1, [width - 1, height - 1]).astype(np.int64)
  cells = np.arange(size)
  for d in np.flatnonzero(np.all(last >= first, axis=1)):
    (x0, y0), (x1, y1) = first[d], last[d]
    box_x0, box_y0, box_x1, box_y1 = boxes[d]
    # Cell coordinates of the window's pixel centres; tent weights without clamping pad with 0.
    us = (np.arange(x0, x1 + 1) + 0.5 - box_x0) / (box_x1 - box_x0) * size - 0.5
    vs = (np.arange(y0, y1 + 1) + 0.5 - box_y0) / (box_y1 - box_y0) * size - 0.5
    column_weights = np.maximum(0, 1 - np.abs(us[:, None] - cells)).astype(np.float32)
    row_weights = np.maximum(0, 1 - np.abs(vs[:, None] - cells)).astype(np.float32)
    window = row_weights @ mask_probs[d] @ column_weights.T
    pasted[d, y0:y1 + 1, x0:x1 + 1] = window >= threshold
  return pasted


def _resampling_weights(coords: jax.Array, inside: jax.Array, length: int) -> jax.Array:
  """Bilinear weights of samples at cell coordinates `coords` (..., S) on an axis of `length`
  cells (clamped to the end cells; 0 where not `inside`) -> (..., S, length)."""
  coords = jnp.clip(coords, 0, length - 1)
  weights = jnp.maximum(0.0, 1.0 - jnp.abs(coords[..., None] - jnp.arange(length)))
  return weights * inside[..., None]


def mask_targets(gt_mask_crops: jax.Array, gt_boxes: jax.Array, rois: jax.Array,
                 matched_gt: jax.Array, *, output_size: int = 28) -> jax.Array:
  """The mask head's targets: each RoI's matched ground truth, resampled over the RoI.

  Bin (i, j) of RoI r's target reads the matched instance's crop bilinearly at the bin's centre
  (cells clamped at the crop's edge, 0 outside the ground-truth box), thresholded >= 0.5. The
  crops are box-relative (`crop_masks_to_boxes`), so an RoI equal to its ground-truth box gets the
  crop resampled to output_size. Static shapes, jittable; no gradient.

  Args:
    gt_mask_crops: uint8 or float (B, G, M, M) in {0, 1}, the ground truths' crops.
    gt_boxes: float (B, G, 4), the ground-truth boxes (x0, y0, x1, y1), input pixels.
    rois: float (B, R, 4), the RoIs in the same pixels.
    matched_gt: int32 (B, R), each RoI's ground truth (an index into G).
    output_size: the target's side.

  Returns:
    float32 (B, R, output_size, output_size) in {0, 1}.
  """
  if gt_mask_crops.ndim != 4 or gt_mask_crops.shape[2] != gt_mask_crops.shape[3]:
    raise ValueError(f'gt_mask_crops must be (B, G, M, M), got shape {gt_mask_crops.shape}')
  crop_size = gt_mask_crops.shape[-1]
  take = jax.vmap(lambda values, index: values[index])
  crops = take(gt_mask_crops, matched_gt).astype(jnp.float32)  # (B, R, M, M)
  boxes = jax.lax.stop_gradient(take(gt_boxes, matched_gt).astype(jnp.float32))  # (B, R, 4)
  xs, ys = _bin_centres(jax.lax.stop_gradient(rois.astype(jnp.float32)), output_size, xp=jnp)

  def weights(centres, start, end):  # Along one axis: centres (B, R, out) -> (B, R, out, M).
    start, end = start[..., None], end[..., None]
    coords = (centres - start) / jnp.maximum(end - start, 1e-6) * crop_size - 0.5
    return _resampling_weights(coords, (centres >= start) & (centres <= end), crop_size)

  row_weights = weights(ys, boxes[..., 1], boxes[..., 3])
  column_weights = weights(xs, boxes[..., 0], boxes[..., 2])
  values = jnp.einsum('brim,brmn,brjn->brij', row_weights, crops, column_weights,
                      precision=jax.lax.Precision.HIGHEST)
  return (values >= 0.5).astype(jnp.float32)
