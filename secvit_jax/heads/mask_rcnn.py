"""Mask R-CNN (He et al. 2017) as mmdet 2.x builds it, with static shapes for XLA.

A backbone, an FPN over its four maps with a fifth level by stride-2 subsampling (strides 4-64),
a region proposal network, and RoI heads on the proposals: Shared2FC box classification and
regression on 7×7 RoIAlign features, and a mask head of four 3×3 convs, a 2× deconv and 1×1
class-specific 28×28 logits on 14×14 features. Layout NHWC; boxes (x0, y0, x1, y1) in canvas
pixels.

Training (`MaskRCNN(..., train=True)` then `loss`): the module assigns and samples the RPN's
anchors (0.7 / 0.3, 256 per image, at most half positive), takes the proposals (no gradient),
samples 512 RoIs per image (ground truths prepended, IoU >= 0.5 positive, at most 25% positive),
runs the box head on them and the mask head on up to 128 positives; `loss` is BCE + L1 for the
RPN over its sampled anchors, CE + L1 for the box head over the sampled RoIs, and BCE on the
ground-truth class's 28×28 logits against targets resampled from the ground truths' box-relative
crops (`detection.masks.mask_targets`), averaged over positives × 28 × 28.

Inference (`train=False`): softmax, per-class decoding, clipping, scores > `score_threshold`, the
best `pre_nms_top_k` (RoI, class) pairs, class-wise NMS, `max_detections` per image, then the mask
head on the final boxes: each detection's 28×28 mask probabilities of its class.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from secvit_jax.detection import anchors as anchor_lib
from secvit_jax.detection import assign as assign_lib
from secvit_jax.detection import boxes as box_ops
from secvit_jax.detection import masks as mask_lib
from secvit_jax.detection import nms
from secvit_jax.detection import proposals as proposal_lib
from secvit_jax.detection import roi_align
from secvit_jax.detection import sampling
from secvit_jax.heads import fpn

Dtype = Any

# mmdet's initializations: RPN convs normal(0.01); the box head's FCs Xavier-uniform, its class
# logits normal(0.01) and deltas normal(0.001); the mask head's convs and deconv Kaiming-normal
# (fan out, ReLU gain); biases zero.
rpn_init = nn.initializers.normal(stddev=0.01)
fc_init = nn.initializers.xavier_uniform()
class_init = nn.initializers.normal(stddev=0.01)
delta_init = nn.initializers.normal(stddev=0.001)
kaiming_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

# The RoIAlign levels: P2-P5 (the fifth FPN level only carries proposals).
ROI_STRIDES = (4, 8, 16, 32)


@dataclasses.dataclass(frozen=True)
class MaskRCNNSettings:
  """Everything of Mask R-CNN besides its modules' sizes; the defaults are mmdet's (and RMT's)."""
  anchors: anchor_lib.AnchorGenerator = anchor_lib.AnchorGenerator(
      strides=(4, 8, 16, 32, 64), octave_base_scale=8.0, scales_per_octave=1,
      ratios=(0.5, 1.0, 2.0))
  size_divisor: int = 32  # Padding multiple of an image for the anchors' valid flags.
  # RPN assignment and sampling.
  rpn_positive_iou: float = 0.7
  rpn_negative_iou: float = 0.3
  rpn_min_best_iou: float = 0.3
  rpn_num_samples: int = 256
  rpn_positive_fraction: float = 0.5
  # Proposals.
  train_pre_nms_top_k: int = 2000  # Per level.
  test_pre_nms_top_k: int = 1000
  proposal_nms_iou: float = 0.7
  num_proposals: int = 1000  # Over all levels.
  # RoI sampling.
  roi_num_samples: int = 512
  roi_positive_fraction: float = 0.25
  roi_positive_iou: float = 0.5
  num_mask_rois: int = 128
  # RoI heads.
  sampling_ratio: int = 2  # Bilinear samples per bin side (mmdet: adaptive).
  box_stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)
  # Decoding.
  score_threshold: float = 0.05
  pre_nms_top_k: int = 1000  # (RoI, class) pairs per image before NMS (mmdet: no cap).
  nms_iou: float = 0.5
  max_detections: int = 100
  # Side of the ground truths' box-relative mask crops in a training batch.
  mask_crop_size: int = 112

  @classmethod
  def from_config(cls, fields: Mapping[str, Any]) -> MaskRCNNSettings:
    """From a config's `mask_rcnn` settings: these fields' names, and `anchor_strides`,
    `anchor_scale`, `anchor_ratios` for the anchors (one scale per location). Unknown names are
    an error naming them."""
    fields = dict(fields)
    anchor_fields = {'anchor_strides': 'strides', 'anchor_scale': 'octave_base_scale',
                     'anchor_ratios': 'ratios'}
    anchors = {anchor_fields[name]: fields.pop(name) for name in list(fields)
               if name in anchor_fields}
    for name in ('strides', 'ratios'):
      if name in anchors:
        anchors[name] = tuple(anchors[name])
    if 'box_stds' in fields:
      fields['box_stds'] = tuple(fields['box_stds'])
    known = {field.name for field in dataclasses.fields(cls)} - {'anchors'}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise ValueError(f'unknown Mask R-CNN setting(s) {unknown}; known: '
                       f'{sorted(known | set(anchor_fields))}')
    settings = cls(anchors=anchor_lib.AnchorGenerator(scales_per_octave=1, **anchors), **fields)
    if len(settings.anchors.strides) != 5:
      raise ValueError(f'anchor_strides {settings.anchors.strides}: Mask R-CNN has 5 FPN levels')
    return settings


class RPNHead(nn.Module):
  """A 3×3 conv + ReLU shared by the levels, then 1×1 convs to A objectness logits and A·4
  deltas per location.

  `__call__(maps)` -> (logits, deltas): per level float32 (B, H_l·W_l·A) and (B, H_l·W_l·A, 4),
  in `detection.anchors`' order.
  """
  num_anchors: int = 3
  features: int = 256
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, maps: Sequence[jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
    shared = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                     kernel_init=rpn_init, name='conv')
    objectness = nn.Conv(self.num_anchors, (1, 1), dtype=self.dtype, kernel_init=rpn_init,
                         name='objectness')
    deltas = nn.Conv(self.num_anchors * 4, (1, 1), dtype=self.dtype, kernel_init=rpn_init,
                     name='deltas')
    all_logits, all_deltas = [], []
    for x in maps:
      x = nn.relu(shared(x))
      batch = x.shape[0]
      all_logits.append(objectness(x).astype(jnp.float32).reshape(batch, -1))
      all_deltas.append(deltas(x).astype(jnp.float32).reshape(batch, -1, 4))
    return all_logits, all_deltas


class BoxHead(nn.Module):
  """Shared2FC: flattened RoI features -> FC + ReLU -> FC + ReLU -> K + 1 class logits (the last
  is background) and K·4 class-specific deltas.

  `__call__(features (B, R, S, S, C))` -> (logits float32 (B, R, K + 1), deltas float32
  (B, R, K, 4)).
  """
  num_classes: int
  features: int = 1024
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, roi_features: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = roi_features.reshape(*roi_features.shape[:2], -1)
    for i in range(2):
      x = nn.relu(nn.Dense(self.features, dtype=self.dtype, kernel_init=fc_init,
                           name=f'fc_{i}')(x))
    logits = nn.Dense(self.num_classes + 1, dtype=self.dtype, kernel_init=class_init,
                      name='class_logits')(x)
    deltas = nn.Dense(self.num_classes * 4, dtype=self.dtype, kernel_init=delta_init,
                      name='box_deltas')(x)
    return (logits.astype(jnp.float32),
            deltas.astype(jnp.float32).reshape(*deltas.shape[:2], self.num_classes, 4))


class Deconv2x(nn.Module):
  """A 2×2 stride-2 transposed convolution (PyTorch's ConvTranspose2d(kernel 2, stride 2)): each
  input pixel becomes its own 2×2 block of the output through the 2×2 kernel. As one matrix
  product and a reshape, which XLA differentiates on the CPU ~40× faster than `nn.ConvTranspose`.

  `__call__(x (N, H, W, C))` -> (N, 2H, 2W, features).
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', kaiming_init, (2, 2, x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    blocks = jnp.einsum('nhwc,abco->nhawbo', x, kernel)  # Output pixel (2h + a, 2w + b).
    batch, height, _, width = blocks.shape[:4]
    return blocks.reshape(batch, 2 * height, 2 * width, self.features) + bias


class ClassMaskLogits(nn.Module):
  """The mask head's last layer, a 1×1 conv to K class-specific logits, evaluated for one class
  per RoI: the parameters of `nn.Conv(K, (1, 1))` ('kernel' (1, 1, C, K), 'bias' (K,)), but only
  the logits of each RoI's class `labels`, the one the loss and the detections read, are computed
  (a K-times smaller product, and a backward pass without the other classes' zero gradients).

  `__call__(x (N, H, W, C), labels int32 (N,))` -> (N, H, W): RoI n's logits of class labels[n].
  """
  num_classes: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, labels: jax.Array) -> jax.Array:
    kernel = self.param('kernel', kaiming_init, (1, 1, x.shape[-1], self.num_classes))
    bias = self.param('bias', nn.initializers.zeros, (self.num_classes,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    weights = kernel[0, 0].T[labels]  # (N, C): each RoI's class's column.
    return jnp.einsum('nhwc,nc->nhw', x, weights) + bias[labels][:, None, None]


class MaskHead(nn.Module):
  """`num_convs` 3×3 convs + ReLU, a 2×2 stride-2 deconv + ReLU, a 1×1 conv to K mask logits
  (`ClassMaskLogits`: only those of each RoI's class are computed).

  `__call__(features (B, R, S, S, C), labels int32 (B, R))` -> float32 (B, R, 2S, 2S): the
  logits of each RoI's class `labels` (in [0, K)).
  """
  num_classes: int
  features: int = 256
  num_convs: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, roi_features: jax.Array, labels: jax.Array) -> jax.Array:
    batch, rois = roi_features.shape[:2]
    x = roi_features.reshape(batch * rois, *roi_features.shape[2:])
    for i in range(self.num_convs):
      x = nn.relu(nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                          kernel_init=kaiming_init, name=f'conv_{i}')(x))
    x = nn.relu(Deconv2x(self.features, self.dtype, name='deconv')(x))
    logits = ClassMaskLogits(self.num_classes, self.dtype, name='mask_logits')(
        x, labels.reshape(-1))
    return logits.reshape(batch, rois, *logits.shape[1:]).astype(jnp.float32)


class MaskRCNN(nn.Module):
  """Backbone, FPN, RPN, box and mask heads; see the module docstring.

  Attributes:
    backbone: maps (B, H, W, 3) normalized images (and `train`) to a tuple of feature maps at
      strides 4, 8, 16, 32 (a `secvit_jax.model.SecViTBackbone`); held as the child 'backbone'.
    num_classes: K (without background).
    settings: anchors, sampling and decoding.
    fpn_features, rpn_features, fc_features, mask_features, mask_convs: the modules' widths and
      the mask head's depth.
    dtype: the compute dtype of the neck and heads (losses and box coding are float32).

  `__call__(images, train=False, *, image_size=None, gt_boxes=None, gt_labels=None,
  gt_valid=None)`: images float32 (B, H, W, 3) on the canvas; image_size int32 (B, 2) each
  image's (height, width) on it (None: the whole canvas); in training the ground truths, padded:
  gt_boxes float32 (B, G, 4) canvas pixels, gt_labels int32 (B, G), gt_valid bool (B, G); and a
  'sampling' PRNG stream. Returns in training the dict `loss` reads; else the `detections` dict
  with 'masks' float32 (B, D, 2·14, 2·14): each detection's mask probabilities of its class over
  its box.
  """
  backbone: nn.Module
  num_classes: int
  settings: MaskRCNNSettings = MaskRCNNSettings()
  fpn_features: int = 256
  rpn_features: int = 256
  fc_features: int = 1024
  mask_features: int = 256
  mask_convs: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False, *,
               image_size: jax.Array | None = None, gt_boxes: jax.Array | None = None,
               gt_labels: jax.Array | None = None, gt_valid: jax.Array | None = None
               ) -> dict[str, Any]:
    settings = self.settings
    batch, height, width = images.shape[:3]
    if image_size is None:
      image_size = jnp.broadcast_to(jnp.asarray([height, width], jnp.int32), (batch, 2))
    features = self.backbone(images, train=train)
    levels = fpn.FPN(features=self.fpn_features, num_outputs=5, start_level=0,
                     extra_convs_on_input=False, dtype=self.dtype, name='neck')(features)
    rpn_logits, rpn_deltas = RPNHead(num_anchors=settings.anchors.num_per_location,
                                     features=self.rpn_features, dtype=self.dtype,
                                     name='rpn_head')(levels)
    sizes = tuple((level.shape[1], level.shape[2]) for level in levels)
    level_anchors = [jnp.asarray(settings.anchors.level_anchors(i, h, w))
                     for i, (h, w) in enumerate(sizes)]
    # No gradient through the proposals: stopped at their inputs, so that differentiation does not
    # trace (and keep residuals of) the NMS loop.
    proposals, _, proposal_valid = proposal_lib.generate_proposals(
        jax.lax.stop_gradient(rpn_logits), jax.lax.stop_gradient(rpn_deltas), level_anchors,
        image_size,
        pre_nms_top_k=settings.train_pre_nms_top_k if train else settings.test_pre_nms_top_k,
        nms_threshold=settings.proposal_nms_iou, post_nms_top_k=settings.num_proposals)
    box_head = BoxHead(self.num_classes, self.fc_features, self.dtype, name='box_head')
    mask_head = MaskHead(self.num_classes, self.mask_features, self.mask_convs, self.dtype,
                         name='mask_head')
    roi_maps = list(levels[:len(ROI_STRIDES)])

    def align(boxes, output_size):
      return roi_align.multilevel_roi_align(roi_maps, boxes, output_size=output_size,
                                            strides=ROI_STRIDES,
                                            sampling_ratio=settings.sampling_ratio)

    if not train:
      class_logits, box_deltas = box_head(align(proposals, 7))
      found = detections(class_logits, box_deltas, proposals, proposal_valid, image_size,
                         settings)
      mask_logits = mask_head(align(found['boxes'], 14), found['labels'])
      return {**found, 'masks': jax.nn.sigmoid(mask_logits)}

    if gt_boxes is None or gt_labels is None or gt_valid is None:
      raise ValueError('MaskRCNN(train=True) needs gt_boxes, gt_labels and gt_valid')
    rpn_key, roi_key = jax.random.split(self.make_rng('sampling'))
    anchors = jnp.concatenate(level_anchors)
    rpn = rpn_targets(anchors, settings.anchors.valid(sizes, image_size, settings.size_divisor),
                      gt_boxes, gt_valid, rpn_key, settings)
    samples = sampling.sample_rois(
        proposals, proposal_valid, gt_boxes, gt_labels, gt_valid, roi_key,
        num_samples=settings.roi_num_samples, positive_fraction=settings.roi_positive_fraction,
        positive_iou=settings.roi_positive_iou, num_mask_rois=settings.num_mask_rois,
        background_label=self.num_classes)
    class_logits, box_deltas = box_head(align(samples['rois'], 7))
    class_index = jnp.minimum(samples['labels'], self.num_classes - 1)
    # The positives fill the first slots: the mask branch takes the first Q.
    mask_slots = slice(0, settings.num_mask_rois)
    mask_rois = samples['rois'][:, mask_slots]
    mask_labels = jnp.minimum(samples['labels'][:, mask_slots], self.num_classes - 1)
    return {
        'rpn_logits': jnp.concatenate(rpn_logits, axis=1),
        'rpn_deltas': jnp.concatenate(rpn_deltas, axis=1),
        **rpn,
        'class_logits': class_logits,
        'box_deltas': jnp.take_along_axis(box_deltas, class_index[..., None, None],
                                          axis=2)[:, :, 0],
        **{f'roi_{name}': samples[name]
           for name in ('rois', 'labels', 'matched_gt', 'positive', 'weights')},
        'mask_logits': mask_head(align(mask_rois, 14), mask_labels),
        'mask_rois': mask_rois,
        'mask_matched_gt': samples['matched_gt'][:, mask_slots],
        'mask_valid': samples['mask_valid'],
    }


# ------------------------------------------------------------------------------------------------
# Training targets and loss.
# ------------------------------------------------------------------------------------------------


def _encodable(boxes: jax.Array, where: jax.Array) -> jax.Array:
  """`boxes` (..., 4) where `where` (...), a unit box elsewhere: padded boxes encode to NaN."""
  return jnp.where(where[..., None], boxes, jnp.asarray([0.0, 0.0, 1.0, 1.0], boxes.dtype))


def rpn_targets(anchors: jax.Array, valid: jax.Array, gt_boxes: jax.Array, gt_valid: jax.Array,
                key: jax.Array, settings: MaskRCNNSettings) -> dict[str, jax.Array]:
  """The RPN's sampled anchors and their box targets.

  Args:
    anchors: float32 (N, 4), every level's, concatenated.
    valid: bool (B, N), the anchors on each image's padded extent.
    gt_boxes: float32 (B, G, 4); gt_valid: bool (B, G), the real (non-crowd) ones.
    key: the sampling's PRNG key.
    settings: the assignment and sampling settings.

  Returns:
    'rpn_positive', 'rpn_negative' bool (B, N) (the sampled anchors), 'rpn_box_targets' float32
    (B, N, 4) (means 0, stds 1; zero where not positive). No gradient.
  """
  assign = jax.vmap(lambda v, b, m: assign_lib.max_iou_assign(
      anchors, v, b, m, jnp.zeros_like(m), positive_iou=settings.rpn_positive_iou,
      negative_iou=settings.rpn_negative_iou, min_best_iou=settings.rpn_min_best_iou,
      crowd_iof=0.0))
  assignment = assign(valid, gt_boxes, gt_valid)
  labels = jnp.where(assignment.positive, 1, jnp.where(assignment.negative, 0, -1))
  positive, negative = sampling.sample_anchors(
      labels.astype(jnp.int32), key, num_samples=settings.rpn_num_samples,
      positive_fraction=settings.rpn_positive_fraction)
  matched = jnp.take_along_axis(gt_boxes, assignment.matched[..., None], axis=1)
  targets = box_ops.encode(_encodable(jnp.broadcast_to(anchors, matched.shape), positive),
                           _encodable(matched, positive))
  return jax.lax.stop_gradient({'rpn_positive': positive, 'rpn_negative': negative,
                                'rpn_box_targets': jnp.where(positive[..., None], targets, 0.0)})


def loss(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
         settings: MaskRCNNSettings) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mask R-CNN's training loss on a batch, from the module's training outputs.

  Args:
    outputs: `MaskRCNN(..., train=True)`'s dict: the RPN's 'rpn_logits' (B, N), 'rpn_deltas'
      (B, N, 4), 'rpn_positive', 'rpn_negative', 'rpn_box_targets'; the S sampled RoIs'
      'class_logits' (B, S, K + 1), 'box_deltas' (B, S, 4) (of each RoI's label's class),
      'roi_rois', 'roi_labels', 'roi_matched_gt', 'roi_positive', 'roi_weights'; the M mask
      slots' 'mask_logits' (B, M, m, m), 'mask_rois', 'mask_matched_gt', 'mask_valid'.
    batch: 'boxes' float32 (B, G, 4) in canvas pixels and 'gt_mask_crops' uint8 (B, G, C, C),
      each ground truth's mask over its box (`detection.masks.crop_masks_to_boxes`).
    settings: the box coding.

  Returns:
    (the sum of the five losses, {each loss, 'rpn_positives' and 'roi_positives' per image}).
    The RPN's BCE and L1 are divided by its sampled anchors, the box head's CE (weighted) and L1
    (positives, their class) by the sampled RoIs, the mask BCE by positives × m², all over the
    batch as mmdet does.
  """
  f32 = jnp.float32
  rpn_positive, rpn_negative = outputs['rpn_positive'], outputs['rpn_negative']
  rpn_samples = jnp.maximum(jnp.sum(rpn_positive | rpn_negative), 1).astype(f32)
  rpn_bce = optax.sigmoid_binary_cross_entropy(outputs['rpn_logits'], rpn_positive.astype(f32))
  rpn_class_loss = jnp.sum(jnp.where(rpn_positive | rpn_negative, rpn_bce, 0.0)) / rpn_samples
  rpn_box_loss = jnp.sum(jnp.where(rpn_positive[..., None], jnp.abs(
      outputs['rpn_deltas'] - outputs['rpn_box_targets']), 0.0)) / rpn_samples

  weights, positive = outputs['roi_weights'], outputs['roi_positive']
  roi_samples = jnp.maximum(jnp.sum(weights), 1.0)
  class_loss = jnp.sum(weights * optax.softmax_cross_entropy_with_integer_labels(
      outputs['class_logits'], outputs['roi_labels'])) / roi_samples
  matched = jnp.take_along_axis(batch['boxes'], outputs['roi_matched_gt'][..., None], axis=1)
  box_targets = box_ops.encode(_encodable(outputs['roi_rois'], positive),
                               _encodable(matched, positive), stds=settings.box_stds)
  box_loss = jnp.sum(jnp.where(positive[..., None], jnp.abs(
      outputs['box_deltas'] - box_targets), 0.0)) / roi_samples

  mask_logits, mask_valid = outputs['mask_logits'], outputs['mask_valid']
  mask_targets = mask_lib.mask_targets(batch['gt_mask_crops'], batch['boxes'],
                                       outputs['mask_rois'], outputs['mask_matched_gt'],
                                       output_size=mask_logits.shape[-1])
  mask_bce = optax.sigmoid_binary_cross_entropy(mask_logits, mask_targets)
  mask_pixels = jnp.maximum(jnp.sum(mask_valid), 1).astype(f32) * mask_logits[0, 0].size
  mask_loss = jnp.sum(jnp.where(mask_valid[..., None, None], mask_bce, 0.0)) / mask_pixels

  losses = {'rpn_class_loss': rpn_class_loss, 'rpn_box_loss': rpn_box_loss,
            'class_loss': class_loss, 'box_loss': box_loss, 'mask_loss': mask_loss}
  per_image = lambda x: jnp.mean(jnp.sum(x, axis=1).astype(f32))
  return sum(losses.values()), {**losses, 'rpn_positives': per_image(rpn_positive),
                                'roi_positives': per_image(positive)}


# ------------------------------------------------------------------------------------------------
# Decoding.
# ------------------------------------------------------------------------------------------------


def detections(class_logits: jax.Array, box_deltas: jax.Array, proposals: jax.Array,
               proposal_valid: jax.Array, image_size: jax.Array, settings: MaskRCNNSettings
               ) -> dict[str, jax.Array]:
  """The box head's detections of a batch, on the device.

  Args:
    class_logits: float32 (B, P, K + 1), background last; box_deltas: float32 (B, P, K, 4).
    proposals: float32 (B, P, 4) canvas pixels; proposal_valid: bool (B, P).
    image_size: int32 (B, 2), each image's (height, width) on the canvas: boxes are clipped to it.
    settings: the box coding and decoding settings.

  Returns:
    'boxes' float32 (B, D, 4) (x0, y0, x1, y1) canvas pixels, 'scores' float32 (B, D), 'labels'
    int32 (B, D), 'kept' bool (B, D): D = max_detections slots, best first, the unused ones
    (kept False) with score 0.
  """
  batch, num_proposals, num_classes = box_deltas.shape[:3]
  scores = jax.nn.softmax(class_logits, axis=-1)[..., :num_classes]  # (B, P, K)
  boxes = box_ops.decode(proposals[:, :, None, :], box_deltas, stds=settings.box_stds)
  size = image_size.astype(jnp.float32)[:, None, None, :]
  boxes = box_ops.clip(boxes, size[..., 0], size[..., 1]).reshape(batch, -1, 4)
  candidate = (scores > settings.score_threshold) & proposal_valid[..., None]
  top_scores, top = jax.lax.top_k(jnp.where(candidate, scores, -1.0).reshape(batch, -1),
                                  min(settings.pre_nms_top_k, num_proposals * num_classes))
  top_boxes = jnp.take_along_axis(boxes, top[..., None], axis=1)
  labels = (top % num_classes).astype(jnp.int32)
  return nms.survivors(top_boxes, top_scores, labels, top_scores > settings.score_threshold,
                       iou_threshold=settings.nms_iou, max_outputs=settings.max_detections)
