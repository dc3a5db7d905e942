"""The input-pipeline benchmark's plumbing: each recipe's synthetic dataset read by its task's own
data, and the TPU compile result of each recipe's own train step (no speed is asserted)."""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import tensorflow as tf

from benchmarks import input_pipeline
from secvit_jax import tasks

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks',
                       'results')
RECIPE_WRITERS = {module: write for _, module, write in input_pipeline.RECIPES}


def _config(module):
  return importlib.import_module(f'configs.{module}').get_config()


@pytest.mark.parametrize('module,result_file', [
    ('secvit_s', 'tpu_secvit_s_v5e_2x4.json'),
    ('ade20k_upernet_secvit_s', 'tpu_secvit_s_upernet_v5e_2x4.json'),
    # The detection configs set remat: their steps without it do not fit a v5e chip.
    ('coco_retinanet_secvit_s', 'tpu_secvit_s_retinanet_v5e_2x4_remat.json'),
    ('coco_mask_rcnn_secvit_s_1x', 'tpu_secvit_s_mask_rcnn_v5e_2x4_remat.json'),
    ('coco_mask_rcnn_secvit_s_3x', 'tpu_secvit_s_mask_rcnn_v5e_2x4_remat.json'),
])
def test_each_recipe_reads_the_tpu_compile_of_its_own_train_step(module, result_file):
  name, result = input_pipeline.tpu_compile_result(RESULTS, _config(module))
  assert name == result_file
  assert result['fits'] and result['flops_per_step'] > 0


def test_a_train_step_not_compiled_for_the_tpu_is_an_error_naming_the_script(tmp_path):
  with pytest.raises(FileNotFoundError, match='benchmarks.tpu_compile'):
    input_pipeline.tpu_compile_result(str(tmp_path), _config('secvit_s'))


@pytest.mark.parametrize('module,shapes', [
    ('ade20k_upernet_secvit_s', {'image': (512, 512, 3), 'label': (512, 512)}),
    ('coco_mask_rcnn_secvit_s_3x', {'image': (1344, 1344, 3), 'boxes': (100, 4),
                                    'gt_mask_crops': (100, 112, 112)}),
])
def test_synthetic_datasets_are_read_by_the_recipes_own_data(tmp_path, module, shapes):
  config = _config(module)
  config.update(RECIPE_WRITERS[module](str(tmp_path), 2))
  train = tasks.get_task_class(config.task).create_data(config).train_input(0, 1)
  assert train.share.num_examples == 2
  _, features = next(iter(train.share.elements(None, 0)))
  example = train.preprocess(features, tf.constant([0, 7], tf.int64))
  for key, shape in shapes.items():
    assert tuple(example[key].shape) == shape, key
  if 'gt_mask_crops' in example:  # Every image has instances, each a mask over its box.
    count = int(np.sum(example['box_mask']))
    assert count >= 1 and np.all(np.asarray(example['gt_mask_crops'][:count]).any(axis=(1, 2)))
