"""Detection end to end: `train.py` runs of a tiny RetinaNet on digit scenes, in subprocesses, and
the COCO recipes.

The runs share a persistent XLA compilation cache, so the programs compiled by the reference run
load in the others; the reference run is also the uninterrupted run of the resume test.
"""

import dataclasses
import importlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

import secvit_jax
from secvit_jax import model as model_lib
from secvit_jax import train_lib
from secvit_jax.data import sources
from secvit_jax.evaluation import coco
from secvit_jax.heads import retinanet
from secvit_jax.tasks import detection as task_lib
from tests import conftest

TOTAL_STEPS = 6
# configs/det_demo.py shrunk: 64 × 64 scenes, a backbone of one block per stage, a neck and head of
# 16 channels; the runs spend their time compiling, and this compiles in a fraction of the time.
TINY = (
    '--config=configs/det_demo.py',
    '--config.model.embed_dims=(8,16,16,16)',
    '--config.model.depths=(1,1,1,1)',
    '--config.model.num_heads=(1,1,1,1)',
    '--config.model.num_clusters=(2,1,-1,-1)',
    '--config.model.drop_path_rate=0.1',
    '--config.retinanet.fpn_features=16',
    '--config.retinanet.head_features=16',
    '--config.retinanet.stacked_convs=1',
    # Every candidate passes: the runs are too short for scores above 0.05, and evaluation,
    # saved predictions and their comparison with `predict` should see detections.
    '--config.retinanet.score_threshold=0.0',
    '--config.digit_scenes.num_train=24',
    '--config.digit_scenes.num_val=6',
    '--config.digit_scenes.height=64',
    '--config.digit_scenes.width=64',
    '--config.digit_scenes.digit_sizes=(14,28)',
    '--config.input.canvas_size=(64,64)',
    '--config.input.max_size=(64,64)',
    '--config.max_boxes=4',
    '--config.batch_size=4',
    '--config.eval_batch_size=3',
    f'--config.total_steps={TOTAL_STEPS}',
    '--config.optimizer.warmup_steps=2',
    '--config.optimizer.decay_steps=(4,)',
    '--config.eval_every_steps=3',
    '--config.checkpoint_every_steps=3',
    '--config.log_every_steps=1',
)


def _start(environment, scenes, workdir, *flags):
  """Starts train.py on the tiny config in `workdir`; stderr is piped."""
  return conftest.start(environment, 'train.py', *TINY, f'--config.data_dir={scenes}',
                        f'--workdir={workdir}', *flags)


def _train(environment, scenes, workdir, *flags, returncode=0):
  return conftest.finish(_start(environment, scenes, workdir, *flags), returncode)


def _metrics(workdir):
  return conftest.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))


@pytest.fixture(scope='module')
def reference(environment, scenes, tmp_path_factory):
  """The workdir of an uninterrupted run that saves its predictions."""
  workdir = tmp_path_factory.mktemp('reference')
  _train(environment, scenes, workdir, '--config.save_predictions=True')
  return workdir


def test_training_steps_evaluate_with_cocoeval_and_save_predictions(reference):
  metrics = _metrics(reference)
  train = [m for m in metrics if 'train/loss' in m]
  assert [m['step'] for m in train] == list(range(1, TOTAL_STEPS + 1))
  for m in train:
    assert m['train/loss'] > 0 and m['train/class_loss'] > 0 and m['train/positives'] > 0
    assert np.isclose(m['train/loss'], m['train/class_loss'] + m['train/box_loss'], rtol=1e-5)
  evals = [m for m in metrics if 'eval/AP' in m]
  assert [m['step'] for m in evals] == [3, 6]
  for name in coco.METRICS:
    assert -1 <= evals[-1][f'eval/{name}'] <= 1, name
  assert not any(name.startswith('eval_ema') for name in evals[-1])  # No EMA.
  assert sorted(int(n) for n in os.listdir(reference / 'checkpoints') if n.isdigit()) == [3, 6]
  for step in (3, 6):
    predictions = json.loads((reference / 'predictions' / f'eval_step_{step}.json').read_text())
    assert isinstance(predictions, list)
    for detection in predictions:
      assert set(detection) == {'image_id', 'category_id', 'bbox', 'score'}
      assert 1 <= detection['category_id'] <= 10 and 1 <= detection['image_id'] <= 6
      x, y, w, h = detection['bbox']
      assert 0 <= x <= x + w <= 64 and 0 <= y <= y + h <= 64 and detection['score'] > 0
    assert len(predictions) == 6 * 100  # 100 detections for each of the 6 images.
  variables = secvit_jax.load_variables(str(reference))
  assert {'backbone', 'neck', 'head'} == set(variables['params'])
  assert 'backbone' in variables['batch_stats']


def test_a_stopped_detection_run_resumes_bit_equal(environment, scenes, reference, tmp_path):
  stopped_at = conftest.stop_once_training_starts(
      _start(environment, scenes, tmp_path, '--config.save_predictions=True'), tmp_path,
      TOTAL_STEPS)
  log = _train(environment, scenes, tmp_path, '--config.save_predictions=True')
  conftest.assert_resumed_bit_equal(tmp_path, reference, log, stopped_at, TOTAL_STEPS, 'eval/AP')


def test_init_from_a_classifier_loads_the_backbone():
  config = importlib.import_module('configs.det_demo').get_config()
  task = task_lib.DetectionTask(config, sources.DatasetInfo(10, 100, 10))
  variables = conftest.zero_variables(task)
  loaded = conftest.random_classifier(config.model, image_size=128)
  merged, notes = task.load_pretrained(variables, loaded, 'classifier')
  for collection in ('params', 'batch_stats'):
    jax.tree.map(np.testing.assert_array_equal,
                 {key: merged[collection]['backbone'][key] for key in loaded[collection]
                  if key in merged[collection]['backbone']},
                 {key: value for key, value in loaded[collection].items()
                  if key.startswith(('stem', 'stage_'))})
  assert not merged['params']['head']['class_logits']['kernel'].any()  # Kept as initialized.
  assert not merged['params']['backbone']['out_norm_0']['scale'].any()
  [note] = notes
  assert note.startswith('backbone from the classifier: loaded ')
  assert 'left out of the classifier: head, norm, proj' in note
  # A detector's own checkpoint fills the whole model.
  again, notes = task.load_pretrained(variables, merged, 'detector')
  assert notes == []
  jax.tree.map(np.testing.assert_array_equal, again, merged)


def test_predict_draws_what_evaluation_found(environment, scenes, reference, tmp_path):
  image = os.path.join(scenes, 'images', 'validation', '00001.png')  # Image id 2.
  result = subprocess.run(
      [sys.executable, '-m', 'secvit_jax.predict', str(reference), image, '--json',
       '--min_score=0', f'--output_dir={tmp_path / "pictures"}'],
      cwd=conftest.REPO, env=environment, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'images resized to fit 64×64 on a 64×64 canvas' in result.stderr
  [found] = json.loads(result.stdout)['results']
  saved = [d for d in json.loads((reference / 'predictions' / 'eval_step_6.json').read_text())
           if d['image_id'] == 2]
  assert len(found['detections']) == len(saved) == 100
  np.testing.assert_allclose([d['score'] for d in found['detections']],
                             [d['score'] for d in saved], atol=1e-5)
  boxes = np.array([d['box'] for d in found['detections']])
  np.testing.assert_allclose(np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1),
                             [d['bbox'] for d in saved], atol=0.02)
  assert [d['class'] + 1 for d in found['detections']] == [d['category_id'] for d in saved]
  assert [d['name'] for d in found['detections']] == [str(d['class'])
                                                      for d in found['detections']]
  assert found['picture'] == str(tmp_path / 'pictures' / '00001_detections.png')
  picture = np.asarray(Image.open(found['picture']))
  assert picture.shape == (64, 64, 3) and np.any(picture != np.asarray(Image.open(image)))
  model_json = json.loads((reference / 'model.json').read_text())
  assert model_json['task'] == 'detection' and model_json['class_names'] == [
      str(d) for d in range(10)]
  assert model_json['task_settings']['canvas_size'] == [64, 64]
  assert model_json['task_settings']['detector'] == 'retinanet'


# ------------------------------------------------------------------------------------------------
# The recipes.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('variant', ['secvit_t', 'secvit_s', 'secvit_b', 'secvit_l'])
def test_coco_configs_follow_the_1x_recipe(variant):
  config = importlib.import_module(f'configs.coco_retinanet_{variant}').get_config()
  assert config.task == 'detection' and config.model.name == variant
  assert config.model.drop_path_rate == model_lib.VARIANTS[variant]['drop_path_rate']
  assert config.batch_size == 16 and config.dtype == 'bfloat16'
  # COCO train2017 as mmdet trains on it: 117,266 images with boxes.
  durations = train_lib.durations_from_config(config, 117_266)
  assert durations.steps_per_epoch == 7329 and durations.total_steps == 12 * 7329
  assert durations.warmup_steps == 500
  _, schedule = train_lib.create_optimizer(config, durations)
  np.testing.assert_allclose(
      [schedule(0), schedule(500), schedule(8 * 7329 - 1), schedule(8 * 7329),
       schedule(11 * 7329 - 1), schedule(11 * 7329)],
      [4e-7, 4e-4, 4e-4, 4e-5, 4e-5, 4e-6], rtol=1e-5)
  assert config.detector == 'retinanet'
  settings = task_lib.DetectionTask(config, sources.DatasetInfo(80, 100, 10)).detector.settings
  assert settings.anchors.strides == (8, 16, 32, 64, 128)
  assert settings.anchors.num_per_location == 9
  assert (settings.positive_iou, settings.negative_iou) == (0.5, 0.4)
  assert (settings.pre_nms_top_k, settings.score_threshold, settings.nms_iou,
          settings.max_detections) == (1000, 0.05, 0.5, 100)


def test_the_recipe_retinanet_has_mmdets_neck_and_head():
  # secvit_t: the stage widths (64, 128, 256, 512) of secvit_s, fewer blocks to trace.
  config = importlib.import_module('configs.coco_retinanet_secvit_t').get_config()
  config.input.canvas_size = (256, 384)
  task = task_lib.DetectionTask(config, sources.DatasetInfo(80, 100, 10))
  model = task.create_model()
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *task.init_inputs(),
                                                train=False))
  params = variables['params']
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  assert count(params['backbone']) == 13_429_440 + 1_920  # secvit_t's stages and output norms.
  assert count(params['neck']) == 3_770_368  # mmdet's RetinaNet FPN on (128, 256, 512).
  conv = 3 * 3 * 256 * 256 + 256
  assert count(params['head']) == 8 * conv + 3 * 3 * 256 * (720 + 36) + 720 + 36
  class_maps, box_maps = jax.eval_shape(
      lambda v: model.apply(v, np.zeros((2, 256, 384, 3), np.float32)), variables)
  assert [m.shape for m in class_maps] == [(2, h, w, 720) for h, w in
                                           ((32, 48), (16, 24), (8, 12), (4, 6), (2, 3))]
  assert [m.shape for m in box_maps] == [(2, h, w, 36) for h, w in
                                         ((32, 48), (16, 24), (8, 12), (4, 6), (2, 3))]


def test_the_detector_is_chosen_by_config_and_an_old_model_json_builds_retinanet():
  config = importlib.import_module('configs.det_demo').get_config()
  task = task_lib.DetectionTask(config, sources.DatasetInfo(10, 100, 10))
  info = task.model_info()
  assert info.task_settings['detector'] == 'retinanet'
  assert info.task_settings['retinanet']['fpn_features'] == 64
  # model.json from before config.detector: no 'detector', read as RetinaNet.
  old = dataclasses.replace(info, task_settings={
      key: value for key, value in info.task_settings.items() if key != 'detector'})
  model = task_lib.DetectionTask.build_model(old)
  assert model == task_lib.DetectionTask.build_model(info) == task.create_model()
  assert isinstance(model, retinanet.RetinaNet) and model.num_anchors == 9
  config.detector = 'retina'
  with pytest.raises(ValueError, match=r"unknown config.detector 'retina'; did you mean "
                     r"'retinanet'\? \(detectors: mask_rcnn, retinanet\)"):
    task_lib.DetectionTask(config, sources.DatasetInfo(10, 100, 10))
