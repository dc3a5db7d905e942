"""Segmentation end to end: `train.py` runs of a tiny UperNet on a few digit scenes, in
subprocesses.

The runs share a persistent XLA compilation cache and one folder of digit scenes; the reference run
(with `save_predictions`) is also the uninterrupted run of the resume test.
"""

import json
import os

import numpy as np
from PIL import Image
import pytest

import secvit_jax
from tests import conftest

TOTAL_STEPS = 6
TINY = (
    '--config=configs/seg_demo.py',
    '--config.model.embed_dims=(8,16,16,16)',
    '--config.model.depths=(1,1,1,1)',
    '--config.model.num_heads=(2,2,2,2)',
    '--config.model.tokens_per_cluster=(16,0,0,0)',
    '--config.head.name=upernet',
    '--config.head.channels=8',
    '--config.head.auxiliary=True',
    '--config.head.auxiliary_channels=8',
    '--config.head.pool_scales=(1,2)',
    '--config.digit_scenes.num_train=16',
    '--config.digit_scenes.num_val=5',
    '--config.digit_scenes.height=(24,32)',
    '--config.digit_scenes.width=(30,40)',
    '--config.digit_scenes.digit_sizes=(10,16)',
    '--config.input.scale=(64,32)',
    '--config.input.crop_size=(32,32)',
    '--config.eval.scale=(64,32)',
    '--config.eval.bucket_multiple=32',
    '--config.eval.crop_size=(32,32)',
    '--config.eval.stride=(21,21)',
    '--config.batch_size=4',
    '--config.eval_batch_size=4',
    f'--config.total_steps={TOTAL_STEPS}',
    '--config.optimizer.warmup_steps=2',
    '--config.eval_every_steps=3',
    '--config.checkpoint_every_steps=3',
    '--config.log_every_steps=1',
)


def _start(environment, scenes, workdir, *flags):
  return conftest.start(environment, 'train.py', *TINY, f'--config.data_dir={scenes}',
                        f'--workdir={workdir}', *flags)


@pytest.fixture(scope='module')
def reference(environment, scenes, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('reference')
  conftest.finish(_start(environment, scenes, workdir, '--config.save_predictions=True'))
  return workdir


def test_training_logs_losses_and_mious_and_writes_per_class_ious_and_predictions(reference,
                                                                                 scenes):
  metrics = conftest.read_jsonl(reference / 'metrics.jsonl')
  train = [m for m in metrics if 'train/loss' in m]
  assert [m['step'] for m in train] == list(range(1, TOTAL_STEPS + 1))
  for m in train:
    np.testing.assert_allclose(m['train/loss'],
                               m['train/decode_loss'] + 0.4 * m['train/aux_loss'], rtol=1e-5)
    assert 0 <= m['train/accuracy'] <= 1
  evals = [m for m in metrics if 'eval/mIoU' in m]
  assert [m['step'] for m in evals] == [3, 6]
  assert all(0 <= m[f'eval/{name}'] <= 1 for m in evals for name in ('mIoU', 'aAcc', 'mAcc'))
  assert sorted(os.listdir(reference / 'checkpoints'))[:2] == ['3', '6']

  with open(reference / 'per_class_iou' / 'eval_step6_whole.json') as f:
    per_class = json.load(f)
  assert [c['class'] for c in per_class['classes']] == ['background'] + [str(d) for d in range(10)]
  np.testing.assert_allclose(per_class['mIoU'], evals[-1]['eval/mIoU'])

  predictions = reference / 'predictions' / 'eval_step6_whole'
  images = os.path.join(scenes, 'images', 'validation')
  assert sorted(os.listdir(predictions)) == sorted(
      name.replace('.jpg', '.png') for name in os.listdir(images))
  for name in os.listdir(predictions):
    predicted = Image.open(predictions / name)
    assert predicted.size == Image.open(os.path.join(images, name[:-4] + '.jpg')).size
    assert np.asarray(predicted).max() < 11 and predicted.mode == 'P'


def test_a_stopped_run_resumes_bit_equal(environment, scenes, reference, tmp_path):
  conftest.stop_once_training_starts(_start(environment, scenes, tmp_path), tmp_path, TOTAL_STEPS)
  conftest.finish(_start(environment, scenes, tmp_path))
  import jax  # pylint: disable=g-import-not-at-top
  jax.tree.map(np.testing.assert_array_equal, secvit_jax.load_variables(str(tmp_path)),
               secvit_jax.load_variables(str(reference)))


def test_eval_only_repeats_the_last_evaluation_and_slides_windows(environment, scenes, reference):
  metrics = conftest.read_jsonl(reference / 'metrics.jsonl')
  [last] = [m for m in metrics if m['step'] == TOTAL_STEPS and 'eval/mIoU' in m]
  for mode in ('whole', 'slide'):
    conftest.finish(_start(environment, scenes, reference, '--config.eval_only=True',
                   f'--config.eval.mode={mode}'))
    with open(reference / 'per_class_iou' / f'eval_step6_{mode}.json') as f:
      assert json.load(f)['eval_mode'] == mode
  whole, slide = conftest.read_jsonl(reference / 'evaluations.jsonl')
  assert whole['step'] == slide['step'] == TOTAL_STEPS
  for name in ('eval/mIoU', 'eval/aAcc', 'eval/mAcc'):
    assert whole[name] == last[name]  # The same model on the same data, exactly.
    assert 0 <= slide[name] <= 1


def test_predict_writes_the_label_map_over_the_image(reference, scenes, tmp_path, capsys):
  from secvit_jax import predict  # pylint: disable=g-import-not-at-top
  from secvit_jax.heads import segmentation as heads  # pylint: disable=g-import-not-at-top
  model, variables = secvit_jax.load_model(str(reference))
  assert isinstance(model, heads.Segmenter) and 'backbone' in variables['params']
  image = os.path.join(scenes, 'images', 'validation', '00001.jpg')
  status = predict.main([str(reference), image, '--output_dir', str(tmp_path), '--top', '3'])
  out, err = capsys.readouterr()
  assert status == 0, err
  assert 'resized to fit 64×32' in err
  overlay = Image.open(tmp_path / '00001_segmentation.png')
  labels = Image.open(tmp_path / '00001_labels.png')
  assert overlay.size == labels.size == Image.open(image).size and labels.mode == 'P'
  assert f'{image} -> {tmp_path / "00001_segmentation.png"}' in out
  shares = [float(line.split('%')[0]) for line in out.splitlines()[2:]]
  assert 0 < len(shares) <= 3 and shares == sorted(shares, reverse=True)
  np.testing.assert_allclose(shares[0], 100 * np.mean(
      np.asarray(labels) == np.bincount(np.asarray(labels).ravel()).argmax()), atol=0.05)
