"""Tests of semantic segmentation: the heads and their parameter counts, the loss, the metrics, the
data (ADE20K reader, joint augmentation, evaluation buckets) and the evaluation's resizing."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest
import torch
from etils import epath

from configs import ade20k_common
from secvit_jax import checkpoints
from secvit_jax import model as model_lib
from secvit_jax import tasks
from secvit_jax import train_lib
from secvit_jax.data import ade20k
from secvit_jax.data import ops
from secvit_jax.data import segmentation as data_lib
from secvit_jax.data import sources
from secvit_jax.evaluation import segmentation as evaluation
from secvit_jax.heads import segmentation as heads
from secvit_jax.tasks import segmentation as task_lib

import tensorflow as tf  # pylint: disable=g-bad-import-order

TINY_ADE = os.path.join(os.path.dirname(__file__), 'testdata', 'ade20k_tiny',
                        'ADEChallengeData2016')
MEAN, STD = np.array(ops.IMAGENET_MEAN) * 255, np.array(ops.IMAGENET_STD) * 255


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def _torch_resize(x, size):
  """PyTorch's bilinear resize (align_corners=False) of NHWC float32 NumPy."""
  t = torch.from_numpy(np.asarray(x, np.float32)).permute(0, 3, 1, 2)
  out = torch.nn.functional.interpolate(t, size=size, mode='bilinear', align_corners=False)
  return out.permute(0, 2, 3, 1).numpy()


def _config(**fields):
  config = ade20k_common.recipe('secvit_t', 'semantic_fpn')
  config.data_dir = TINY_ADE
  config.update(fields)
  return config


# ------------------------------------------------------------------------------------------------
# Model.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('variant, head, parts', [
    ('secvit_t', 'semantic_fpn',
     {'backbone': 13_429_440 + 1_920, 'neck': 2_607_104, 'decode_head': 1_643_158}),
    ('secvit_s', 'upernet',
     {'backbone': 25_223_744 + 1_920, 'decode_head': 29_678_742, 'auxiliary_head': 628_886}),
])
def test_parameter_counts_are_the_recipes(variant, head, parts):
  config = ade20k_common.recipe(variant, head)
  task = task_lib.SegmentationTask(config, sources.DatasetInfo(150, 1, 1))
  model = task.create_model()
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *task.init_inputs()))
  assert {name: _count(tree) for name, tree in variables['params'].items()} == parts
  # mmseg's counts: 17,681,622 (Semantic FPN, secvit_t), 55,533,292 (UperNet + aux, secvit_s).
  assert _count(variables['params']) == {'secvit_t': 17_681_622, 'secvit_s': 55_533_292}[variant]


def test_heads_output_logits_at_stride_4_and_the_auxiliary_only_in_training():
  backbone = model_lib.create_backbone('secvit_t', embed_dims=(8, 16, 16, 16), depths=(1, 1, 1, 1),
                                       num_heads=(2, 2, 2, 2), tokens_per_cluster=(16, 16, 0, 0))
  images = jnp.zeros((2, 50, 70, 3))
  for head in heads.HEADS:
    model = heads.create_segmenter(backbone, head=head, num_classes=5, channels=8,
                                   neck_channels=8, auxiliary=True, auxiliary_channels=8)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    evaluated = jax.eval_shape(model.apply, variables, images)
    assert jax.tree.map(lambda x: x.shape, evaluated) == {'logits': (2, 13, 18, 5)}
    trained, _ = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, rngs={'dropout': jax.random.key(1)},
                                 mutable=['batch_stats']), variables, images)
    assert trained['aux_logits'].shape == (2, 4, 5, 5)


@pytest.mark.parametrize('size_in, size_out', [((13, 18), (50, 70)), ((16, 16), (64, 64)),
                                               ((50, 70), (13, 18)), ((7, 9), (7, 20))])
def test_resize_bilinear_matches_pytorch(size_in, size_out):
  x = np.random.default_rng(0).normal(size=(2, *size_in, 3)).astype(np.float32)
  np.testing.assert_allclose(heads.resize_bilinear(jnp.asarray(x), *size_out),
                             _torch_resize(x, size_out), rtol=0, atol=1e-5)


def test_resize_valid_region_resizes_each_examples_region_as_pytorch():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 40, 48, 4)).astype(np.float32)
  sizes = np.array([[40, 48], [25, 31], [9, 40]], np.int32)
  targets = np.array([[20, 60], [61, 17], [9, 40]], np.int32)
  out = np.asarray(task_lib.resize_valid_region(jnp.asarray(x), sizes, targets, (64, 64)))
  for b, ((h, w), (th, tw)) in enumerate(zip(sizes, targets)):
    expected = _torch_resize(x[b:b + 1, :h, :w], (th, tw))[0]
    np.testing.assert_allclose(out[b, :th, :tw], expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize('size, scale', [((12, 17), 1), ((12, 17), 2), ((11, 6), 3), ((12, 12), 6)])
def test_adaptive_avg_pool_matches_pytorch(size, scale):
  x = np.random.default_rng(2).normal(size=(2, *size, 3)).astype(np.float32)
  expected = torch.nn.functional.adaptive_avg_pool2d(
      torch.from_numpy(x).permute(0, 3, 1, 2), scale).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(heads.adaptive_avg_pool(jnp.asarray(x), scale), expected, atol=1e-6)


def test_a_classifier_loads_into_the_backbone_and_the_heads_keep_their_initialization():
  overrides = dict(embed_dims=(8, 16, 16, 16), depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2))
  config = _config(model=ml_collections.ConfigDict({'name': 'secvit_t', **overrides}))
  task = task_lib.SegmentationTask(config, sources.DatasetInfo(150, 1, 1))
  images = jnp.zeros((1, 32, 32, 3))

  def init(model, seed):  # Random values of the variables' shapes, without compiling the init.
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype),
                        jax.eval_shape(model.init, jax.random.key(0), images))

  variables = init(task.create_model(), 0)
  classifier = init(model_lib.create_model('secvit_t', num_classes=10, **overrides), 1)
  merged, notes = task.load_pretrained(variables, classifier, 'a classifier')
  np.testing.assert_array_equal(merged['params']['backbone']['stem']['conv_0']['kernel'],
                                classifier['params']['stem']['conv_0']['kernel'])
  np.testing.assert_array_equal(
      merged['batch_stats']['backbone']['stage_1']['downsample']['norm']['mean'],
      classifier['batch_stats']['stage_1']['downsample']['norm']['mean'])
  jax.tree.map(np.testing.assert_array_equal, merged['params']['decode_head'],
               variables['params']['decode_head'])
  assert 'left out of the classifier' in notes[0] and 'head' in notes[0]
  # A segmenter's checkpoint loads whole; another class count re-initializes the classifiers.
  other = task_lib.SegmentationTask(config, sources.DatasetInfo(7, 1, 1))
  reloaded, notes = other.load_pretrained(init(other.create_model(), 2), merged, 'a segmenter')
  np.testing.assert_array_equal(reloaded['params']['neck']['lateral_0']['kernel'],
                                merged['params']['neck']['lateral_0']['kernel'])
  assert reloaded['params']['decode_head']['cls']['conv_seg']['kernel'].shape[-1] == 7
  assert 'decode_head/cls/conv_seg' in notes[0]


# ------------------------------------------------------------------------------------------------
# Loss and metrics.
# ------------------------------------------------------------------------------------------------


def test_the_loss_ignores_255_and_averages_over_every_pixel():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 5, 6, 4)).astype(np.float32)
  labels = rng.integers(0, 4, (2, 20, 24)).astype(np.int32)
  labels[0, :7] = 255
  loss = jax.jit(task_lib.pixel_cross_entropy, static_argnums=2)(jnp.asarray(logits),
                                                                 jnp.asarray(labels), 255)
  upsampled = torch.from_numpy(_torch_resize(logits, (20, 24))).permute(0, 3, 1, 2)
  expected = torch.nn.functional.cross_entropy(
      upsampled, torch.from_numpy(labels).long(), ignore_index=255, reduction='none')
  np.testing.assert_allclose(loss, expected.sum().item() / labels.size, rtol=1e-5)
  # Ignored pixels neither count nor pull: their labels do not matter.
  grad = jax.jit(jax.grad(task_lib.pixel_cross_entropy), static_argnums=2)
  changed = labels.copy()
  changed[labels == 255] = 254
  np.testing.assert_allclose(grad(jnp.asarray(logits), jnp.asarray(labels), 255),
                             grad(jnp.asarray(logits), jnp.asarray(changed), 254), atol=1e-8)


def test_miou_aacc_macc_against_brute_force_with_absent_classes():
  rng = np.random.default_rng(4)
  classes = 6  # Class 4 never appears; class 5 is only ever predicted.
  labels = rng.choice([0, 1, 2, 3, 255], (3, 17, 19)).astype(np.int32)
  predictions = rng.choice([0, 1, 2, 3, 5], (3, 17, 19)).astype(np.int32)
  mask = np.array([True, True, False])  # The third example is batch padding.
  valid = (labels != 255) & mask[:, None, None]
  confusion = np.asarray(evaluation.confusion_matrix(
      jnp.asarray(labels), jnp.asarray(predictions), jnp.asarray(valid), classes))
  summary, per_class = evaluation.confusion_metrics(confusion.astype(np.int64))

  true, predicted = labels[valid], predictions[valid]
  ious, accuracies = [], []
  for c in range(classes):
    intersection = np.sum((true == c) & (predicted == c))
    union = np.sum((true == c) | (predicted == c))
    ious.append(intersection / union if union else None)
    accuracies.append(intersection / np.sum(true == c) if np.sum(true == c) else None)
  assert ious[4] is None and ious[5] == 0.0 and accuracies[5] is None
  expected_miou = np.mean([x for x in ious if x is not None])
  np.testing.assert_allclose(summary['mIoU'], expected_miou, rtol=1e-12)
  np.testing.assert_allclose(summary['mAcc'], np.mean([x for x in accuracies if x is not None]),
                             rtol=1e-12)
  np.testing.assert_allclose(summary['aAcc'], np.mean(true == predicted), rtol=1e-12)
  np.testing.assert_allclose(per_class['iou'][:4], ious[:4], rtol=1e-12)
  assert np.isnan(per_class['iou'][4]) and per_class['iou'][5] == 0
  assert per_class['pixels'].sum() == valid.sum()


def test_evaluator_sums_batches_and_writes_per_class_json(tmp_path):
  names = ('a', 'b', 'c', 'd')
  path = tmp_path / 'per_class_iou' / 'eval_step3_whole.json'
  evaluator = evaluation.SegmentationEvaluator(names, epath.Path(path), {'step': 3})
  pad = lambda rows: jnp.pad(jnp.array(rows, jnp.int32), ((0, 1), (0, 1)))
  evaluator.add({'confusion': pad([[5, 1, 0], [0, 2, 0], [0, 0, 0]])})
  evaluator.add({'confusion': pad([[1, 0, 0], [0, 2, 2], [0, 0, 0]])})
  results = evaluator.result()
  # c is only predicted (IoU 0, no accuracy); d is absent (skipped).
  np.testing.assert_allclose(results['mIoU'], np.mean([6 / 7, 4 / 7, 0]))
  np.testing.assert_allclose(results['mAcc'], np.mean([6 / 7, 4 / 6]))
  np.testing.assert_allclose(results['aAcc'], 10 / 13)
  with open(path) as f:
    document = json.load(f)
  assert document['step'] == 3 and document['classes'][2:] == [
      {'class': 'c', 'iou': 0.0, 'accuracy': None, 'pixels': 0, 'predicted': 2},
      {'class': 'd', 'iou': None, 'accuracy': None, 'pixels': 0, 'predicted': 0}]
  np.testing.assert_allclose(document['classes'][1]['iou'], 4 / 7)


def test_slide_windows_are_mmsegs():
  for size in (10, 30, 43, 64, 100, 128):
    canvas, crop, stride = 128, 32, 21
    starts, used = task_lib.slide_window_corners(jnp.int32(size), canvas, crop, stride)
    grids = max(size - crop + stride - 1, 0) // stride + 1
    expected = [max(min(i * stride + crop, size) - crop, 0) for i in range(grids)]
    assert list(np.asarray(starts)[np.asarray(used)]) == expected


# ------------------------------------------------------------------------------------------------
# Data.
# ------------------------------------------------------------------------------------------------


def _blocks(height, width, block, seed):
  """A uint8 image of `block`-pixel squares, each in one of 6 colours, and its class map."""
  colours = np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250], [250, 250, 10],
                      [10, 250, 250], [250, 10, 250]], np.uint8)
  rng = np.random.default_rng(seed)
  classes = rng.integers(0, len(colours), (-(-height // block), -(-width // block)))
  classes = np.kron(classes, np.ones((block, block), np.int64))[:height, :width]
  return colours[classes], classes.astype(np.int32), colours


def test_joint_augmentation_keeps_image_and_labels_aligned():
  image, classes, colours = _blocks(90, 130, 10, seed=0)
  icfg = ade20k_common.recipe('secvit_t', 'semantic_fpn').input
  icfg.update(scale=(160, 80), crop_size=(64, 72), photometric=False, cat_max_ratio=0.75)
  preprocess = data_lib.train_preprocess_fn(icfg, data_lib.LabelFormat(6))
  unflipped = data_lib.train_preprocess_fn(ml_collections.ConfigDict(dict(icfg, hflip=False)),
                                           data_lib.LabelFormat(6))
  features = {'image': tf.io.encode_png(image), 'label': tf.io.encode_png(
      classes.astype(np.uint8)[..., None]), 'label_path': tf.constant('blocks.png')}
  flips = []
  for seed in range(12):
    out = preprocess(features, tf.constant([seed, 7], tf.int64))
    pixels = out['image'].numpy() * STD + MEAN
    labels = out['label'].numpy()
    assert labels.shape == (64, 72) and pixels.shape == (64, 72, 3)
    padding = labels == 255
    # The padding is exactly where the image is the normalization's zero.
    np.testing.assert_array_equal(padding, np.all(np.abs(out['image'].numpy()) < 1e-6, -1))
    # The label of each pixel away from a colour edge is the class of the pixel's colour.
    nearest = np.argmin(np.abs(pixels[..., None, :] - colours[None, None]).sum(-1), -1)
    interior = ~padding
    for axis in (0, 1):
      for shift in (1, -1):
        interior &= np.roll(labels, shift, axis) == labels
    interior[[0, -1]] = interior[:, [0, -1]] = False
    assert interior.sum() > 1000
    np.testing.assert_array_equal(nearest[interior], labels[interior])
    # Image and labels are mirrored together (the other random draws do not depend on it).
    plain = unflipped(features, tf.constant([seed, 7], tf.int64))
    flipped = not np.array_equal(labels, plain['label'].numpy())
    if flipped:  # Mirrored within the crop; the padding stays at the bottom and right.
      rows, cols = np.nonzero(~padding)
      crop = slice(0, rows.max() + 1), slice(0, cols.max() + 1)
      np.testing.assert_array_equal(labels[crop], plain['label'].numpy()[crop][:, ::-1])
      np.testing.assert_array_equal(out['image'].numpy()[crop],
                                    plain['image'].numpy()[crop][:, ::-1])
    flips.append(flipped)
  assert 0 < sum(flips) < len(flips)


def test_photometric_distortion_is_a_per_pixel_colour_map_and_varies():
  image = np.random.default_rng(5).integers(0, 256, (20, 30, 3), dtype=np.uint8)
  image[:10] = image[10:]  # Equal pixels must stay equal.
  outputs = [data_lib.photometric_distortion(tf.constant(image), tf.constant([s, 1])).numpy()
             for s in range(8)]
  for out in outputs:
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out[:10], out[10:])
  assert sum(not np.array_equal(out, image) for out in outputs) >= 6


def test_random_crop_redraws_until_no_class_dominates():
  labels = np.zeros((100, 100), np.int32)
  labels[:, 70:] = 1  # Only crops of 40 whose left edge is in 41..59 have no class over 75%.
  image = np.zeros((100, 100, 3), np.uint8)
  for seed in range(10):
    _, crop = data_lib.random_crop(tf.constant(image), tf.constant(labels),
                                   tf.constant([seed, 0]), (40, 40), 0.75, 255, attempts=50)
    counts = np.bincount(crop.numpy().ravel(), minlength=2)
    assert counts.min() > 0 and counts.max() / counts.sum() < 0.75


def test_ade20k_reader_on_a_tiny_folder():
  data = data_lib.SegmentationData(_config(batch_size=2, eval_batch_size=2, input=dict(
      _config().input, crop_size=(32, 32), scale=(64, 32))))
  assert data.info == sources.DatasetInfo(150, 3, 2, ade20k.CLASS_NAMES)
  batch = next(data.local_train_batches(0, 1))
  assert batch['image'].shape == (2, 32, 32, 3) and batch['label'].shape == (2, 32, 32)
  # reduce_zero_label: 0 ("other") -> 255, k -> k - 1.
  assert set(np.unique(batch['label'])) <= {0, 12, 149, 255} | set(range(1, 149))
  assert 255 in batch['label'] and 149 in batch['label']

  batches = list(data.local_eval_batches(0, 1))
  assert len(data.eval_buckets) == 2  # 36×50 -> 512×711, 44×44 -> 512×512.
  assert sum(int(b['mask'].sum()) for b in batches) == 2
  for b in batches:
    (index,) = b['index'][b['mask']]
    name = data.source.listing('validation').names[index]
    original = np.asarray(Image.open(os.path.join(TINY_ADE, 'annotations', 'validation',
                                                  name + '.png')), np.int32)
    h, w = original.shape
    np.testing.assert_array_equal(b['original_size'][0], (h, w))
    np.testing.assert_array_equal(b['label'][0, :h, :w], np.where(original == 0, 255,
                                                                  original - 1))
    assert np.all(b['label'][0, h:] == 255) and np.all(b['label'][0, :, w:] == 255)
    assert b['size'][0].min() == 512 and b['image'].shape[1:3] == (
        -(-b['size'][0][0] // 128) * 128, -(-b['size'][0][1] // 128) * 128)


def test_eval_sizes_fit_the_scale_and_align_to_the_divisor():
  ecfg = _config().eval
  assert data_lib.eval_size(375, 500, ecfg) == (512, 683)
  assert data_lib.eval_size(3000, 400, ecfg) == (2048, 273)
  ecfg.size_divisor = 32
  assert data_lib.eval_size(375, 500, ecfg) == (512, 704)


def test_scene_parse150_is_refused_with_the_folder_layout():
  with pytest.raises(ValueError, match='not the 150-class ADE20K.*ADEChallengeData2016'):
    data_lib.SegmentationData(_config(dataset='scene_parse150'))


def test_a_folder_with_a_missing_label_map_or_bad_values_is_an_error_naming_it(tmp_path):
  for split in ('training', 'validation'):
    for sub in ('images', 'annotations'):
      os.makedirs(tmp_path / sub / split)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'images' / split / 'a.png')
  labels = tmp_path / 'annotations'
  Image.fromarray(np.full((8, 8), 7, np.uint8)).save(labels / 'training' / 'a.png')
  config = _config(dataset='folder', data_dir=str(tmp_path), batch_size=1)
  config.folder.num_classes = 5
  with pytest.raises(FileNotFoundError, match='have no label map.*a.png'):
    data_lib.SegmentationData(config)
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(labels / 'validation' / 'a.png')
  data = data_lib.SegmentationData(config)
  with pytest.raises(tf.errors.InvalidArgumentError, match='training/a.png has values outside'):
    next(data.local_train_batches(0, 1))


def test_palette_label_maps_read_as_their_indices(tmp_path):
  values = np.arange(12, dtype=np.uint8).reshape(3, 4)
  palette = task_lib.class_palette([str(i) for i in range(12)])
  task_lib.label_png(values, palette, reduce_zero_label=False).save(tmp_path / 'p.png')
  assert Image.open(tmp_path / 'p.png').mode == 'P'
  decoded = data_lib.decode_label(tf.io.read_file(str(tmp_path / 'p.png'))).numpy()
  np.testing.assert_array_equal(decoded, values)
  rendered = task_lib.render_label_map(np.zeros((3, 4, 3), np.uint8), values.astype(np.int32),
                                       palette, opacity=1.0)
  np.testing.assert_array_equal(rendered, palette[values])
  np.testing.assert_array_equal(task_lib.class_palette(ade20k.CLASS_NAMES)[0], (120, 120, 120))





def test_learning_rate_without_warmup_starts_at_the_peak():
  opt = ml_collections.ConfigDict(dict(schedule='poly', power=0.9, min_lr=1e-6, warmup_lr=0.0))
  schedule = train_lib.learning_rate_schedule(opt, 1e-4, 100, 0)
  np.testing.assert_allclose(schedule(0), 1e-4)
  np.testing.assert_allclose(schedule(50), (1e-4 - 1e-6) * 0.5**0.9 + 1e-6, rtol=1e-6)


def test_model_json_rebuilds_the_segmenter():
  config = ade20k_common.recipe('secvit_s', 'upernet')
  config.model.update(depths=(1, 1, 2, 1), drop_path_rate=0.0)
  config.head.channels = 64
  task = task_lib.SegmentationTask(config, sources.DatasetInfo(150, 1, 1, ade20k.CLASS_NAMES))
  info = task.model_info()
  assert info.task == 'segmentation' and info.image_size == 512
  assert info.model_overrides == {'depths': [1, 1, 2, 1], 'drop_path_rate': 0.0,
                                  'tokens_per_cluster': [98, 98, 98, 0]}
  assert info.task_settings['head']['name'] == 'upernet'
  assert info.task_settings['eval_scale'] == [2048, 512]
  info = checkpoints.ModelInfo.from_json(json.loads(json.dumps(info.to_json())), 'model.json')
  shapes = lambda model: jax.tree.map(lambda x: x.shape, jax.eval_shape(
      model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  assert shapes(tasks.TASKS['segmentation'].build_model(info)) == shapes(task.create_model())
