"""RetinaNet (Lin et al. 2017) as mmdet 2.x builds it: a backbone, an FPN from stride 8 with two
extra levels, and class and box subnets shared by the levels; its loss and its decoding.

Layout: NHWC maps; the A anchors of a location are the channel groups of a head output
(A · K class logits, A · 4 box deltas), which flatten to the anchor order of
`detection.anchors` (levels concatenated from the finest, locations row-major, anchors last).

Training (`loss`): anchors assigned by IoU (`detection.assign`), sigmoid focal loss over the
positive and negative anchors and L1 on the positives' (dx, dy, dw, dh) deltas, both summed and
divided by the positives (at least one per image). Inference (`detect`): per level the top
`pre_nms_top_k` (anchor, class) scores above `score_threshold`, decoded and clipped to the image,
then class-aware NMS on the device, `max_detections` per image.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from secvit_jax.detection import anchors as anchor_lib
from secvit_jax.detection import assign as assign_lib
from secvit_jax.detection import boxes as box_ops
from secvit_jax.detection import nms
from secvit_jax.heads import fpn

Dtype = Any
Maps = tuple[jax.Array, ...]  # One (B, H_l, W_l, C) map per pyramid level, finest first.

# mmdet's RetinaHead: every conv normal(std 0.01) with zero bias, and the class logits' bias set
# so that every anchor starts with probability `prior_prob` of each class.
head_init = nn.initializers.normal(stddev=0.01)


@dataclasses.dataclass(frozen=True)
class RetinaNetSettings:
  """Everything of RetinaNet besides its modules: anchors, assignment, loss and decoding.

  The defaults are mmdet's RetinaNet (and the RMT / SecViT 1x recipes).
  """
  anchors: anchor_lib.AnchorGenerator = anchor_lib.AnchorGenerator()
  # Assignment (`detection.assign.max_iou_assign`).
  positive_iou: float = 0.5
  negative_iou: float = 0.4
  crowd_iof: float = 0.5
  # Padding multiple of an image for the anchors' valid flags.
  size_divisor: int = 32
  # Loss.
  focal_alpha: float = 0.25
  focal_gamma: float = 2.0
  box_loss_weight: float = 1.0
  # Decoding.
  score_threshold: float = 0.05
  pre_nms_top_k: int = 1000
  nms_iou: float = 0.5
  max_detections: int = 100

  @classmethod
  def from_config(cls, fields: Mapping[str, Any]) -> RetinaNetSettings:
    """From a config's `retinanet` fields: these settings' names, and `anchor_strides`,
    `octave_base_scale`, `scales_per_octave`, `anchor_ratios` for the anchors. Unknown names are
    an error naming them."""
    fields = dict(fields)
    anchor_fields = {'anchor_strides': 'strides', 'octave_base_scale': 'octave_base_scale',
                     'scales_per_octave': 'scales_per_octave', 'anchor_ratios': 'ratios'}
    anchors = {anchor_fields[name]: fields.pop(name) for name in list(fields)
               if name in anchor_fields}
    for name in ('strides', 'ratios'):
      if name in anchors:
        anchors[name] = tuple(anchors[name])
    known = {field.name for field in dataclasses.fields(cls)} - {'anchors'}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise ValueError(f'unknown RetinaNet setting(s) {unknown}; known: '
                       f'{sorted(known | set(anchor_fields))}')
    return cls(anchors=anchor_lib.AnchorGenerator(**anchors), **fields)


class RetinaNetHead(nn.Module):
  """The class and box subnets, shared by every level: `stacked_convs` 3×3 convs + ReLU each, then
  a 3×3 conv to A·K class logits and one to A·4 box deltas.

  `__call__(maps)` -> (class logits, box deltas): per level (B, H_l, W_l, A·K) and
  (B, H_l, W_l, A·4), float32.
  """
  num_classes: int
  num_anchors: int = 9
  features: int = 256
  stacked_convs: int = 4
  prior_prob: float = 0.01
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, maps: Sequence[jax.Array]) -> tuple[Maps, Maps]:
    def conv(features, name, bias_init=nn.initializers.zeros):
      return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                     kernel_init=head_init, bias_init=bias_init, name=name)

    class_convs = [conv(self.features, f'class_conv_{i}') for i in range(self.stacked_convs)]
    box_convs = [conv(self.features, f'box_conv_{i}') for i in range(self.stacked_convs)]
    prior_bias = -math.log((1 - self.prior_prob) / self.prior_prob)
    class_out = conv(self.num_anchors * self.num_classes, 'class_logits',
                     nn.initializers.constant(prior_bias))
    box_out = conv(self.num_anchors * 4, 'box_deltas')

    def subnet(x, convs, out):
      for layer in convs:
        x = nn.relu(layer(x))
      return out(x).astype(jnp.float32)

    return (tuple(subnet(x, class_convs, class_out) for x in maps),
            tuple(subnet(x, box_convs, box_out) for x in maps))


class RetinaNet(nn.Module):
  """Backbone, FPN, RetinaNet head.

  Attributes:
    backbone: maps (B, H, W, 3) normalized images (and `train`) to a tuple of feature maps at
      strides 4, 8, 16, 32 (a `secvit_jax.model.SecViTBackbone`); held as the child 'backbone'.
    num_classes: K.
    num_anchors: A per location.
    fpn_features, head_features, stacked_convs: the neck's channels; the subnets' channels and
      depth.
    dtype: the compute dtype of the neck and head.

  `__call__(images, train=False)` -> (class logits, box deltas) as `RetinaNetHead`'s, for levels
  at strides 8, 16, 32, 64, 128.
  """
  backbone: nn.Module
  num_classes: int
  num_anchors: int = 9
  fpn_features: int = 256
  head_features: int = 256
  stacked_convs: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> tuple[Maps, Maps]:
    features = self.backbone(images, train=train)
    levels = fpn.FPN(features=self.fpn_features, num_outputs=5, start_level=1,
                     extra_convs_on_input=True, dtype=self.dtype, name='neck')(features)
    return RetinaNetHead(num_classes=self.num_classes, num_anchors=self.num_anchors,
                         features=self.head_features, stacked_convs=self.stacked_convs,
                         dtype=self.dtype, name='head')(levels)


# ------------------------------------------------------------------------------------------------
# Loss.
# ------------------------------------------------------------------------------------------------


def flatten_levels(maps: Maps, last: int) -> jax.Array:
  """Per-level (B, H_l, W_l, A·last) -> (B, N, last), levels concatenated in anchor order."""
  return jnp.concatenate([m.reshape(m.shape[0], -1, last) for m in maps], axis=1)


def level_sizes(maps: Maps) -> tuple[tuple[int, int], ...]:
  return tuple((m.shape[1], m.shape[2]) for m in maps)


def loss(class_maps: Maps, box_maps: Maps, batch: Mapping[str, jax.Array],
         settings: RetinaNetSettings) -> tuple[jax.Array, dict[str, jax.Array]]:
  """RetinaNet's training loss on a batch.

  Args:
    class_maps, box_maps: the model's outputs.
    batch: 'boxes' float32 (B, G, 4) in canvas pixels, 'labels' int32 (B, G), 'box_mask' bool
      (B, G) (real boxes), 'crowd' bool (B, G), 'image_size' int32 (B, 2) (height, width of each
      image on the canvas).
    settings: the anchors, assignment and loss settings.

  Returns:
    (focal loss + weight × L1 loss, {'class_loss', 'box_loss', 'positives' (per image)}); the
    sums are divided by Σ_images max(positives, 1), mmdet's normalizer.
  """
  num_classes = class_maps[0].shape[-1] // settings.anchors.num_per_location
  sizes = level_sizes(class_maps)
  logits = flatten_levels(class_maps, num_classes)  # (B, N, K)
  deltas = flatten_levels(box_maps, 4)  # (B, N, 4)
  anchors = jnp.asarray(settings.anchors.anchors(sizes))
  valid = settings.anchors.valid(sizes, batch['image_size'], settings.size_divisor)
  assign = jax.vmap(lambda v, b, m, c: assign_lib.max_iou_assign(
      anchors, v, b, m, c, positive_iou=settings.positive_iou,
      negative_iou=settings.negative_iou, crowd_iof=settings.crowd_iof))
  assignment = assign(valid, batch['boxes'], batch['box_mask'], batch['crowd'])
  positive = assignment.positive
  matched_labels = jnp.take_along_axis(batch['labels'], assignment.matched, axis=1)
  targets = jax.nn.one_hot(matched_labels, num_classes) * positive[..., None]
  focal = optax.sigmoid_focal_loss(logits, targets, alpha=settings.focal_alpha,
                                   gamma=settings.focal_gamma)
  counted = positive | assignment.negative
  class_loss = jnp.sum(jnp.where(counted[..., None], focal, 0.0))

  matched_boxes = jnp.take_along_axis(batch['boxes'], assignment.matched[..., None], axis=1)
  box_targets = jnp.where(positive[..., None], box_ops.encode(anchors[None], matched_boxes), 0.0)
  box_loss = jnp.sum(jnp.where(positive[..., None], jnp.abs(deltas - box_targets), 0.0))

  positives = jnp.sum(positive, axis=1)
  normalizer = jnp.sum(jnp.maximum(positives, 1)).astype(jnp.float32)
  class_loss, box_loss = class_loss / normalizer, box_loss / normalizer
  total = class_loss + settings.box_loss_weight * box_loss
  return total, {'class_loss': class_loss, 'box_loss': box_loss,
                 'positives': jnp.mean(positives.astype(jnp.float32))}


# ------------------------------------------------------------------------------------------------
# Decoding.
# ------------------------------------------------------------------------------------------------


def detect(class_maps: Maps, box_maps: Maps, image_size: jax.Array,
           settings: RetinaNetSettings) -> dict[str, jax.Array]:
  """The detections of a batch, on the device.

  Args:
    class_maps, box_maps: the model's outputs.
    image_size: int32 (B, 2), (height, width) of each image on the canvas: boxes are clipped to it.
    settings: the anchors and decoding settings.

  Returns:
    'boxes' float32 (B, D, 4) (x0, y0, x1, y1) in canvas pixels, 'scores' float32 (B, D),
    'labels' int32 (B, D), 'kept' bool (B, D): D = max_detections slots, best first, the unused
    ones (kept False) with score 0.
  """
  num_classes = class_maps[0].shape[-1] // settings.anchors.num_per_location
  height = image_size[:, 0:1].astype(jnp.float32)
  width = image_size[:, 1:2].astype(jnp.float32)
  candidates = {'boxes': [], 'scores': [], 'labels': []}
  for level, (class_map, box_map) in enumerate(zip(class_maps, box_maps)):
    batch, map_h, map_w = class_map.shape[:3]
    scores = jax.nn.sigmoid(class_map.reshape(batch, -1))  # (B, H·W·A·K)
    top_scores, top = jax.lax.top_k(scores, min(settings.pre_nms_top_k, scores.shape[1]))
    anchor_index = top // num_classes
    anchors = jnp.asarray(settings.anchors.level_anchors(level, map_h, map_w))[anchor_index]
    deltas = jnp.take_along_axis(box_map.reshape(batch, -1, 4), anchor_index[..., None], axis=1)
    candidates['boxes'].append(box_ops.clip(box_ops.decode(anchors, deltas), height, width))
    candidates['scores'].append(top_scores)
    candidates['labels'].append((top % num_classes).astype(jnp.int32))
  boxes, scores, labels = (jnp.concatenate(candidates[name], axis=1)
                           for name in ('boxes', 'scores', 'labels'))
  return nms.survivors(boxes, scores, labels, scores > settings.score_threshold,
                       iou_threshold=settings.nms_iou, max_outputs=settings.max_detections)
