"""Mask R-CNN (heads/mask_rcnn.py, tasks/detectors/mask_rcnn.py): mmdet's parameter counts, the
training loss and its gradients, the decoding's shapes, the recipes, and `train.py` end to end on
tiny digit scenes with masks (evaluation of boxes and masks, bit-equal resume, predict).
"""

import importlib
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import secvit_jax
from secvit_jax import model as model_lib
from secvit_jax import train_lib
from secvit_jax.data import detection as data_lib
from secvit_jax.data import sources
from secvit_jax.evaluation import coco
from secvit_jax.heads import mask_rcnn
from secvit_jax.tasks import detection as task_lib
from tests import conftest


class StridedMaps(nn.Module):
  """A stand-in backbone: one strided conv per stage, maps of `widths` channels at strides
  4-32."""
  widths: tuple[int, ...]

  @nn.compact
  def __call__(self, images, train=False):
    del train
    return tuple(nn.Conv(width, (stride, stride), strides=(stride, stride))(images)
                 for stride, width in zip((4, 8, 16, 32), self.widths))


def _parameters(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('widths, total', [((64, 128, 256, 512), 20_151_024),
                                           ((80, 160, 320, 512), 20_179_696),
                                           ((112, 224, 448, 640), 20_269_808)])
def test_neck_rpn_and_roi_heads_have_mmdets_parameter_count(widths, total):
  model = mask_rcnn.MaskRCNN(backbone=StridedMaps(widths), num_classes=80)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  params = params['params']
  counts = {name: _parameters(tree) for name, tree in params.items() if name != 'backbone'}
  assert sum(counts.values()) == total
  # RPN 3×3 conv, 3 logits and 12 deltas; Shared2FC to 81 classes and 320 deltas; four convs, a
  # deconv and 80 mask logits.
  assert counts['rpn_head'] == 593_935
  assert counts['box_head'] == 14_306_705
  assert counts['mask_head'] == 2_643_280
  assert counts['neck'] == sum(widths) * 256 + 4 * 256 + 4 * (9 * 256 * 256 + 256)


TINY_SETTINGS = mask_rcnn.MaskRCNNSettings(
    train_pre_nms_top_k=100, test_pre_nms_top_k=100, num_proposals=40, roi_num_samples=32,
    num_mask_rois=8, pre_nms_top_k=60, max_detections=10, mask_crop_size=16)


def _tiny_model():
  return mask_rcnn.MaskRCNN(backbone=StridedMaps((8, 8, 8, 8)), num_classes=3,
                            settings=TINY_SETTINGS, fpn_features=16, rpn_features=16,
                            fc_features=32, mask_features=16, mask_convs=1)


def _tiny_batch():
  """Two 64×64 images on the canvas (the second 48 high), one and two ground truths of G = 2; a
  crop whose left half is the instance."""
  crops = np.zeros((2, 2, 16, 16), np.uint8)
  crops[:, :, :, :8] = 1
  return {'image': jax.random.uniform(jax.random.key(1), (2, 64, 64, 3)),
          'image_size': jnp.array([[64, 64], [48, 64]], jnp.int32),
          'boxes': jnp.array([[[4., 4, 30, 30], [0, 0, 0, 0]], [[10, 8, 50, 40], [30, 5, 60, 25]]]),
          'labels': jnp.array([[0, 0], [1, 2]], jnp.int32),
          'box_mask': jnp.array([[True, False], [True, True]]),
          'crowd': jnp.zeros((2, 2), bool), 'gt_mask_crops': jnp.asarray(crops)}


def _run(function, *args):
  """`function(*args)` jitted, compiled without XLA's backend optimizations (about 6× quicker
  to compile than by default, for programs that run once)."""
  compiled = jax.jit(function).lower(*args).compile({'xla_backend_optimization_level': 0})
  return compiled(*args)


@pytest.fixture(scope='module')
def tiny():
  """(model, batch, variables) of a tiny Mask R-CNN of 3 classes on two 64×64 images."""
  model, batch = _tiny_model(), _tiny_batch()
  return model, batch, _run(model.init, jax.random.key(0), batch['image'])


def test_training_loss_and_gradients_are_finite(tiny):
  model, batch, variables = tiny

  def loss_and_grads(params, keys):
    def loss(params, key):
      outputs = model.apply({'params': params}, batch['image'], train=True,
                            image_size=batch['image_size'], gt_boxes=batch['boxes'],
                            gt_labels=batch['labels'], gt_valid=batch['box_mask'],
                            rngs={'sampling': key})
      return mask_rcnn.loss(outputs, batch, TINY_SETTINGS)
    return jax.vmap(jax.value_and_grad(loss, has_aux=True), in_axes=(None, 0))(params, keys)

  (totals, all_metrics), all_grads = _run(loss_and_grads, variables['params'],
                                          jax.random.split(jax.random.key(2)))
  total, metrics, grads = jax.tree.map(lambda x: x[0], (totals, all_metrics, all_grads))
  parts = ('rpn_class_loss', 'rpn_box_loss', 'class_loss', 'box_loss', 'mask_loss')
  assert np.isclose(total, sum(metrics[name] for name in parts), rtol=1e-6)
  assert all(metrics[name] > 0 for name in ('rpn_class_loss', 'class_loss', 'mask_loss'))
  # Ground truths join the proposals, so each image has positive RoIs (at least its boxes).
  assert metrics['roi_positives'] >= 1.5 and metrics['rpn_positives'] >= 1.5
  # Freshly initialized mask logits are near 0: BCE near log 2.
  assert abs(metrics['mask_loss'] - np.log(2)) < 0.2
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert all(np.any(grads[name]) for name in ('backbone', 'neck', 'rpn_head', 'box_head',
                                              'mask_head'))
  assert totals[1] != total  # Another sampling key samples other anchors and RoIs.


def test_detections_have_static_shapes_and_mask_probabilities(tiny):
  model, batch, variables = tiny
  found = _run(lambda v: model.apply(v, batch['image'], image_size=batch['image_size']),
               variables)
  assert found['boxes'].shape == (2, 10, 4) and found['masks'].shape == (2, 10, 28, 28)
  assert found['scores'].shape == found['labels'].shape == found['kept'].shape == (2, 10)
  assert found['masks'].dtype == jnp.float32
  assert np.all((found['masks'] >= 0) & (found['masks'] <= 1))
  kept = np.asarray(found['kept'])
  assert kept.any()  # Untrained: the 3 classes share the softmax with background, > 0.05.
  assert np.all(np.asarray(found['scores'])[~kept] == 0)
  assert np.all((found['labels'] >= 0) & (found['labels'] < 3))
  boxes = np.asarray(found['boxes'])[kept]
  rows = np.nonzero(kept)[0]
  heights = np.asarray(batch['image_size'])[rows, 0]
  assert np.all(boxes >= 0) and np.all(boxes[:, 3] <= heights) and np.all(boxes[:, 2] <= 64)


def test_settings_from_config_name_the_unknown_field():
  config = importlib.import_module('configs.coco_mask_rcnn_secvit_t_1x').get_config()
  fields = config.mask_rcnn.to_dict()
  detector = task_lib.DetectionTask(config, sources.DatasetInfo(80, 100, 10)).detector
  assert detector.settings == mask_rcnn.MaskRCNNSettings()  # The recipe is mmdet's defaults.
  with pytest.raises(ValueError, match=r"config.mask_rcnn: unknown Mask R-CNN setting\(s\) "
                                       r"\['rpn_iou'\]"):
    type(detector)({**fields, 'rpn_iou': 0.7})


# ------------------------------------------------------------------------------------------------
# The recipes.
# ------------------------------------------------------------------------------------------------

RECIPES = [('secvit_t', '1x', 4e-4, 12, (8, 11)), ('secvit_s', '1x', 4e-4, 12, (8, 11)),
           ('secvit_b', '1x', 4e-4, 12, (8, 11)), ('secvit_l', '1x', 2e-4, 12, (8, 11)),
           ('secvit_s', '3x', 4e-4, 36, (27, 33)), ('secvit_b', '3x', 2e-4, 36, (27, 33))]


@pytest.mark.parametrize('variant, schedule, lr, epochs, decay', RECIPES)
def test_coco_configs_follow_rmts_recipe(variant, schedule, lr, epochs, decay):
  config = importlib.import_module(f'configs.coco_mask_rcnn_{variant}_{schedule}').get_config()
  assert config.task == 'detection' and config.detector == 'mask_rcnn'
  assert config.model.name == variant and 'retinanet' not in config
  assert config.model.drop_path_rate == model_lib.VARIANTS[variant]['drop_path_rate']
  assert config.batch_size == 16 and config.dtype == 'bfloat16'
  assert config.optimizer.weight_decay == 0.05
  assert config.optimizer.weight_decay_rule == 'not_norms'
  steps = 7329  # COCO train2017 as mmdet trains on it: 117,266 images with boxes.
  durations = train_lib.durations_from_config(config, 117_266)
  assert durations.total_steps == epochs * steps and durations.warmup_steps == 500
  _, schedule_fn = train_lib.create_optimizer(config, durations)
  np.testing.assert_allclose(
      [schedule_fn(0), schedule_fn(500), schedule_fn(decay[0] * steps - 1),
       schedule_fn(decay[0] * steps), schedule_fn(decay[1] * steps)],
      [lr * 1e-3, lr, lr, lr * 0.1, lr * 0.01], rtol=1e-5)
  transform = data_lib.Transform.from_config(config, encoded=True)
  assert transform.max_size == (1333, 800) and transform.hflip
  if schedule == '3x':  # Policy (a), or (b) then (a).
    assert transform.short_sides == (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    assert transform.crop_short_sides == (400, 500, 600) and transform.crop_size == (384, 600)
  else:
    assert transform.short_sides == transform.crop_short_sides == ()
  task = task_lib.DetectionTask(config, sources.DatasetInfo(80, 100, 10))
  assert task.best_metric == 'segm_AP'
  assert task.abstract_train_batch(2)['gt_mask_crops'].shape == (2, 100, 112, 112)


def test_the_whole_secvit_t_model_counts_its_backbone_and_mmdets_heads():
  config = importlib.import_module('configs.coco_mask_rcnn_secvit_t_1x').get_config()
  config.input.canvas_size = (128, 128)  # The count does not depend on it; tracing does.
  task = task_lib.DetectionTask(config, sources.DatasetInfo(80, 100, 10))
  model = task.create_model()
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), *task.init_inputs(),
                                             train=False))['params']
  assert _parameters(params['backbone']) == 13_429_440 + 1_920  # Stages and output norms.
  assert _parameters(params) == 13_431_360 + 20_151_024 == 33_582_384


# ------------------------------------------------------------------------------------------------
# End to end: train.py on tiny digit scenes with masks, in subprocesses sharing an XLA cache.
# ------------------------------------------------------------------------------------------------

TOTAL_STEPS = 6
# configs/inst_demo.py shrunk: 64 × 64 scenes, a backbone of one block per stage, 16-channel
# heads, a few proposals and sampled RoIs.
TINY = (
    '--config=configs/inst_demo.py',
    '--config.model.embed_dims=(8,16,16,16)',
    '--config.model.depths=(1,1,1,1)',
    '--config.model.num_heads=(1,1,1,1)',
    '--config.model.num_clusters=(2,1,-1,-1)',
    '--config.model.drop_path_rate=0.1',
    '--config.mask_rcnn.fpn_features=16',
    '--config.mask_rcnn.rpn_features=16',
    '--config.mask_rcnn.fc_features=32',
    '--config.mask_rcnn.mask_features=16',
    '--config.mask_rcnn.mask_convs=1',
    '--config.mask_rcnn.train_pre_nms_top_k=100',
    '--config.mask_rcnn.test_pre_nms_top_k=100',
    '--config.mask_rcnn.num_proposals=40',
    '--config.mask_rcnn.roi_num_samples=32',
    '--config.mask_rcnn.num_mask_rois=8',
    '--config.mask_rcnn.pre_nms_top_k=100',
    '--config.mask_rcnn.max_detections=20',
    # Every candidate passes: the runs are too short for scores above 0.05, and evaluation,
    # saved predictions and predict should see detections.
    '--config.mask_rcnn.score_threshold=0.0',
    '--config.mask_rcnn.mask_crop_size=16',
    '--config.digit_scenes.num_train=24',
    '--config.digit_scenes.num_val=6',
    '--config.digit_scenes.height=64',
    '--config.digit_scenes.width=64',
    '--config.digit_scenes.digit_sizes=(14,28)',
    '--config.input.canvas_size=(64,64)',
    '--config.input.max_size=(64,64)',
    '--config.batch_size=4',
    '--config.eval_batch_size=3',
    f'--config.total_steps={TOTAL_STEPS}',
    '--config.optimizer.warmup_steps=2',
    '--config.optimizer.decay_steps=(4,)',
    '--config.eval_every_steps=3',
    '--config.checkpoint_every_steps=3',
    '--config.log_every_steps=1',
    '--config.save_predictions=True',
)


def _start(environment, scenes, workdir):
  return conftest.start(environment, 'train.py', *TINY, f'--config.data_dir={scenes}',
                        f'--workdir={workdir}')


def _metrics(workdir):
  return conftest.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))


@pytest.fixture(scope='module')
def reference(environment, scenes, tmp_path_factory):
  """The workdir of an uninterrupted run."""
  workdir = tmp_path_factory.mktemp('reference')
  conftest.finish(_start(environment, scenes, workdir))
  return workdir


def test_training_evaluates_boxes_and_masks(reference):
  metrics = _metrics(reference)
  train = [m for m in metrics if 'train/loss' in m]
  assert [m['step'] for m in train] == list(range(1, TOTAL_STEPS + 1))
  parts = ('rpn_class_loss', 'rpn_box_loss', 'class_loss', 'box_loss', 'mask_loss')
  for m in train:
    assert np.isclose(m['train/loss'], sum(m[f'train/{name}'] for name in parts), rtol=1e-5)
    assert m['train/mask_loss'] > 0 and m['train/roi_positives'] > 0
  evals = [m for m in metrics if 'eval/segm_AP' in m]
  assert [m['step'] for m in evals] == [3, 6]
  for name in coco.METRICS:
    assert -1 <= evals[-1][f'eval/{name}'] <= 1 and -1 <= evals[-1][f'eval/segm_{name}'] <= 1
  predictions = json.loads((reference / 'predictions' / 'eval_step_6.json').read_text())
  assert len(predictions) == 6 * 20  # 20 detections for each of the 6 images.
  for detection in predictions:
    size, counts = detection['segmentation']['size'], detection['segmentation']['counts']
    assert size == [64, 64] and isinstance(counts, str)
  variables = secvit_jax.load_variables(str(reference))
  assert set(variables['params']) == {'backbone', 'neck', 'rpn_head', 'box_head', 'mask_head'}
  model_json = json.loads((reference / 'model.json').read_text())
  assert model_json['task_settings']['detector'] == 'mask_rcnn'


def test_a_stopped_mask_rcnn_run_resumes_bit_equal(environment, scenes, reference, tmp_path):
  stopped_at = conftest.stop_once_training_starts(_start(environment, scenes, tmp_path), tmp_path,
                                                  TOTAL_STEPS)
  log = conftest.finish(_start(environment, scenes, tmp_path))
  conftest.assert_resumed_bit_equal(tmp_path, reference, log, stopped_at, TOTAL_STEPS,
                                    'eval/segm_AP')


def test_init_from_a_classifier_loads_the_backbone():
  config = importlib.import_module('configs.inst_demo').get_config()
  task = task_lib.DetectionTask(config, sources.DatasetInfo(10, 100, 10))
  variables = conftest.zero_variables(task)
  loaded = conftest.random_classifier(config.model, image_size=128)
  merged, [note] = task.load_pretrained(variables, loaded, 'classifier')
  assert note.startswith('backbone from the classifier: loaded ')
  jax.tree.map(np.testing.assert_array_equal, merged['params']['backbone']['stem'],
               loaded['params']['stem'])
  for head in ('neck', 'rpn_head', 'box_head', 'mask_head'):  # Kept as initialized.
    assert not any(x.any() for x in jax.tree.leaves(merged['params'][head]))


def test_predict_lists_the_masks(environment, scenes, reference, tmp_path):
  image = os.path.join(scenes, 'images', 'validation', '00001.png')
  result = subprocess.run(
      [sys.executable, '-m', 'secvit_jax.predict', str(reference), image, '--json',
       '--min_score=0', f'--output_dir={tmp_path / "pictures"}'],
      cwd=conftest.REPO, env=environment, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  [found] = json.loads(result.stdout)['results']
  assert len(found['detections']) == 20
  for detection in found['detections']:
    assert detection['mask']['size'] == [64, 64] and isinstance(detection['mask']['counts'], str)
  assert os.path.exists(found['picture'])
