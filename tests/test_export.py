"""Export for serving: a reduced model of each task, in each format, round-tripped and compared."""

import json
import os

import jax
import numpy as np
import pytest

from secvit_jax import checkpoints
from secvit_jax import export
from secvit_jax import tasks

pytest.importorskip('jax2onnx', reason='the export extra (requirements-export.txt)')

# A SecViT small enough to export in seconds: 32×32 inputs, one block per stage.
TINY_BACKBONE = {'embed_dims': [16, 32, 32, 32], 'depths': [1, 1, 1, 1],
                 'num_heads': [1, 2, 2, 2], 'num_clusters': [4, 2, 1, -1], 'drop_path_rate': 0.0}
# name -> (task, task settings): a model of each task, and each detector.
MODELS = {
    'classification': ('classification', {}),
    'segmentation': ('segmentation', {
        'head': {'name': 'semantic_fpn', 'channels': 16, 'neck_channels': 16, 'pool_scales': [1],
                 'dropout': 0.0, 'auxiliary': False, 'auxiliary_channels': 16,
                 'auxiliary_in_index': 2},
        'eval_scale': [64, 32]}),
    'detection': ('detection', {
        'detector': 'retinanet',
        'retinanet': {'fpn_features': 16, 'head_features': 16, 'stacked_convs': 1,
                      'pre_nms_top_k': 50, 'max_detections': 10},
        'canvas_size': [32, 48], 'max_size': [48, 32]}),
    'mask_rcnn': ('detection', {
        'detector': 'mask_rcnn',
        'mask_rcnn': {'fpn_features': 16, 'rpn_features': 16, 'fc_features': 16,
                      'mask_features': 8, 'mask_convs': 1, 'anchor_scale': 2.0,
                      'test_pre_nms_top_k': 50, 'num_proposals': 20, 'pre_nms_top_k': 50,
                      'max_detections': 10},
        'canvas_size': [32, 48], 'max_size': [48, 32]}),
}


def _random_variables(model, size, seed):
  """Random variables of `model`'s shapes (no compilation): logits that differ per class and
  position, and a detector whose scores pass its threshold, so the comparisons compare something.
  BatchNorm variances are drawn positive."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, *size, 3),
                                                                           np.float32)))
  rng = np.random.default_rng(seed)
  def draw(path, shape):
    if jax.tree_util.keystr(path).endswith("['var']"):
      return rng.uniform(0.5, 1.5, shape.shape).astype(np.float32)
    return (0.2 * rng.standard_normal(shape.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope='module')
def tiny_checkpoints(tmp_path_factory):
  """name -> a converted-checkpoint directory of that reduced model (`MODELS`)."""
  root = tmp_path_factory.mktemp('tiny')
  paths = {}
  for seed, (name, (task, settings)) in enumerate(MODELS.items()):
    info = checkpoints.ModelInfo(variant='secvit_t', num_classes=3, task=task,
                                 model_overrides={**TINY_BACKBONE, **(
                                     {'projection': 32} if task == 'classification' else {})},
                                 image_size=32,
                                 task_settings=settings)
    model = tasks.TASKS[task].build_model(info)
    size = tasks.TASKS[task].serving_size(info)
    paths[name] = str(root / name)
    checkpoints.save_variables(paths[name], _random_variables(model, size, seed), info.to_json())
  return paths


# (model, format) -> with_preprocessing: each model in each format it supports, the SavedModels
# of the dense tasks taking uint8 images (the ONNX files and the classifier normalized ones).
EXPORTS = {
    ('classification', 'saved_model'): False,
    ('classification', 'onnx'): False,
    ('segmentation', 'saved_model'): True,
    ('segmentation', 'onnx'): False,
    ('detection', 'saved_model'): True,
    ('mask_rcnn', 'saved_model'): True,
}
OUTPUTS = {'classification': ['logits'], 'segmentation': ['logits'],
           'detection': ['boxes', 'classes', 'num_detections', 'scores'],
           'mask_rcnn': ['boxes', 'classes', 'masks', 'num_detections', 'scores']}


@pytest.fixture(scope='module')
def exports(tiny_checkpoints, tmp_path_factory):
  """(model, format) -> (its export's directory, its export.json), each written once."""
  done = {}
  for (name, format), with_preprocessing in EXPORTS.items():
    root = tmp_path_factory.mktemp(f'{name}_{format}')
    metadata = export.export(tiny_checkpoints[name], str(root / 'served'), format=format,
                             with_preprocessing=with_preprocessing)
    assert sorted(os.listdir(root)) == ['served']  # No staging directory left.
    done[name, format] = (root / 'served', metadata)
  return done


@pytest.mark.parametrize('name, format', list(EXPORTS))
def test_each_task_round_trips_in_each_format(exports, name, format):
  out, metadata = exports[name, format]
  assert json.loads((out / export.METADATA_FILE).read_text()) == metadata
  assert metadata['task'] == MODELS[name][0]
  assert metadata['outputs'] == OUTPUTS[name]
  assert metadata['input']['preprocessing'] == EXPORTS[name, format]
  # Two batch sizes through one exported graph: the batch is dynamic (with preprocessing, so are
  # the images' sizes).
  assert [check['input_shape'][0] for check in metadata['checks']] == list(export.CHECK_BATCHES)
  for check in metadata['checks']:
    assert all(value <= export.RELATIVE_TOLERANCE for key, value in check.items()
               if key.endswith('_relative_error'))


def test_the_served_outputs_are_the_tasks(exports):
  """Run again outside the export: a segmenter's logits at the size of the uint8 image, a
  detector's fixed-size detections with their count, best first, in the image's pixels, and
  Mask R-CNN's mask probabilities of each detection."""
  run = export.run_saved_model(str(exports['segmentation', 'saved_model'][0]))
  assert exports['segmentation', 'saved_model'][1]['input']['shape'] == [
      None, None, None, 3]
  assert run(np.zeros((1, 50, 70, 3), np.uint8))['logits'].shape == (1, 50, 70, 3)
  images = np.random.default_rng(0).integers(0, 256, (2, 60, 90, 3), dtype=np.uint8)
  for name in ('detection', 'mask_rcnn'):
    outputs = export.run_saved_model(str(exports[name, 'saved_model'][0]))(images)
    assert outputs['boxes'].shape == (2, 10, 4) and outputs['classes'].dtype == np.int32
    counts = outputs['num_detections']
    assert counts.shape == (2,) and np.all(counts > 0), name
    scores = outputs['scores'][0, :counts[0]]
    assert np.all(scores > 0.05) and np.all(np.diff(scores) <= 0)  # The threshold, best first.
    boxes = outputs['boxes'][0, :counts[0]]
    assert np.all(boxes >= 0) and np.all(boxes[:, [0, 2]] <= 90)
    assert np.all(boxes[:, [1, 3]] <= 60)
  masks = outputs['masks']
  assert masks.shape == (2, 10, 28, 28) and masks.dtype == np.float32
  assert np.all((masks >= 0) & (masks <= 1)) and np.all(masks[0, :counts[0]].max(axis=(1, 2)) > 0)


def test_what_a_converter_cannot_express_is_one_line_naming_task_and_format(tiny_checkpoints,
                                                                           tmp_path):
  with pytest.raises(export.ExportError, match='^detection model cannot be exported as onnx: '
                     'jax2onnx 0.12.5 cannot convert the batched NMS'):
    export.export(tiny_checkpoints['detection'], str(tmp_path / 'out'), format='onnx')
  assert os.listdir(tmp_path) == []


def test_a_bad_checkpoint_or_format_is_one_line_and_writes_nothing(tiny_checkpoints, tmp_path,
                                                                    capsys):
  out = tmp_path / 'out'
  assert export.main([str(tmp_path / 'missing'), str(out), '--format=onnx']) == 1
  message = capsys.readouterr().err
  assert message.startswith('error: ') and message.count('\n') == 1 and 'missing' in message
  with pytest.raises(export.ExportError, match='unknown format'):
    export.export(tiny_checkpoints['classification'], str(out), format='tflite')
  with pytest.raises(SystemExit):
    export.main([tiny_checkpoints['classification'], str(out), '--format=tflite'])
  with pytest.raises(SystemExit):
    export.main([tiny_checkpoints['classification'], str(out), '--format=onnx',
                 '--size=32xx'])
  assert 'got \'32xx\'' in capsys.readouterr().err
  assert os.listdir(tmp_path) == []


def test_a_converter_failure_is_one_line_naming_task_and_format(tiny_checkpoints, tmp_path,
                                                                 monkeypatch):
  def unsupported(*args):
    raise NotImplementedError('scatter pattern not supported in plugins\nmore detail')
  monkeypatch.setitem(export.WRITERS, 'onnx', unsupported)
  with pytest.raises(export.ExportError) as error:
    export.export(tiny_checkpoints['classification'], str(tmp_path / 'out'),
                  format='onnx')
  assert str(error.value) == ('classification model cannot be exported as onnx: '
                              'NotImplementedError: scatter pattern not supported in plugins')
  assert os.listdir(tmp_path) == []


def test_a_mismatch_with_jax_is_an_error():
  reference = {'logits': np.array([[1.0, 2.0, 3.0]], np.float32)}
  assert export.check_outputs('classification', reference, reference) == {
      'logits_relative_error': 0.0, 'argmax_ties': 0}
  with pytest.raises(export.ExportError, match='logits differs from JAX by 3.33e-02'):
    export.check_outputs('classification', reference,
                         {'logits': np.array([[1.0, 2.0, 3.1]], np.float32)})
  with pytest.raises(export.ExportError, match='classes differs from JAX at 1 of 2'):
    export.check_outputs('detection', {'classes': np.array([1, 2], np.int32)},
                         {'classes': np.array([1, 0], np.int32)})


def test_inline_composites_calls_the_decomposition():
  text = ('%0 = stablehlo.composite "chlo.erf" %arg1 {decomposition = @chlo.erf.impl, '
          'version = 1 : i32} : (tensor<?x4xf32>) -> tensor<?x4xf32> loc(#loc11)\n'
          '%1:2 = stablehlo.composite "chlo.top_k" %0 {composite_attributes = {k = 5 : i64}, '
          'decomposition = @chlo.top_k.impl} : (tensor<?x4xf32>) -> (tensor<?x5xf32>, '
          'tensor<?x5xi32>)\n')
  assert export.inline_composites(text) == (
      '%0 = func.call @chlo.erf.impl(%arg1) : (tensor<?x4xf32>) -> tensor<?x4xf32> loc(#loc11)\n'
      '%1:2 = func.call @chlo.top_k.impl(%0) : (tensor<?x4xf32>) -> (tensor<?x5xf32>, '
      'tensor<?x5xi32>)\n')
