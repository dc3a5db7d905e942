"""The side-by-side benchmark's plumbing: the release's imports without timm and fvcore, its
train step and Mixup/CutMix in torch, and the two warm workers taking turns.

The release's code is not in the repository: `testdata/fake_release` is a stand-in checkout whose
SecViT.py makes the same imports and defines a tiny model under the release's function name.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('einops')

from benchmarks import gpu  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import readme_table  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import release  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import throughput  # pylint: disable=g-import-not-at-top,wrong-import-position

FAKE_RELEASE = os.path.join(os.path.dirname(__file__), 'testdata', 'fake_release')
MIXING = {'num_classes': 10, 'mixup_alpha': 0.8, 'cutmix_alpha': 1.0, 'switch_prob': 0.5,
          'label_smoothing': 0.1}


def test_release_model_imports_with_the_standins_only_where_packages_are_absent():
  model = release.create_release_model(FAKE_RELEASE, 'secvit_t')
  assert model.default_cfg['input_size'] == (3, 224, 224)
  for name in ('timm', 'fvcore'):
    from_standin = sys.modules[name].__file__.startswith(str(release.STANDINS))
    installed = any(os.path.exists(os.path.join(path, name))
                    for path in sys.path if path and path != str(release.STANDINS))
    assert from_standin != installed, name


def test_release_checkout_errors_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    release.import_release_model(str(tmp_path))
  with pytest.raises(ValueError, match='secvit_x'):
    release.create_release_model(FAKE_RELEASE, 'secvit_x')


def test_drop_path_standin_drops_whole_samples_and_rescales_in_training_only():
  release.import_release_model(FAKE_RELEASE)
  from timm.models.layers import DropPath  # pylint: disable=g-import-not-at-top
  layer = DropPath(0.5)
  x = torch.ones(64, 3, 4, 4)
  torch.manual_seed(0)
  y = layer.train()(x)
  per_sample = y.reshape(64, -1)
  assert set(per_sample.unique().tolist()) == {0.0, 2.0}
  assert (per_sample == per_sample[:, :1]).all()  # One decision per sample.
  assert torch.equal(layer.eval()(x), x)


@pytest.mark.parametrize('mixup_alpha,cutmix_alpha', [(0.8, 0.0), (0.0, 1.0)])
def test_torch_mixup_and_cutmix_mix_with_the_reversed_batch(mixup_alpha, cutmix_alpha):
  images = torch.arange(4 * 3 * 16 * 16, dtype=torch.float32).reshape(4, 3, 16, 16)
  labels = torch.tensor([0, 1, 2, 3])
  mixing = {**MIXING, 'mixup_alpha': mixup_alpha, 'cutmix_alpha': cutmix_alpha}
  mixed, targets = release.mix_batch(images.clone(), labels, rng=np.random.default_rng(1),
                                     **mixing)
  np.testing.assert_allclose(targets.sum(-1).numpy(), 1.0, rtol=1e-6)
  # The weight of each image's own label is λ (smoothed); the reversed image's is 1 - λ.
  lam = float((targets[0, 0] - 0.01) / 0.9)
  np.testing.assert_allclose(float((targets[0, 3] - 0.01) / 0.9), 1 - lam, rtol=1e-5)
  if cutmix_alpha:
    from_reversed = (mixed == images.flip(0)).all(dim=1)  # (B, H, W) pixels pasted.
    kept = (mixed == images).all(dim=1)
    assert (from_reversed | kept).all()
    np.testing.assert_allclose(kept[0].float().mean().item(), lam, rtol=1e-6)
  else:
    np.testing.assert_allclose(mixed.numpy(), (lam * images + (1 - lam) * images.flip(0)).numpy(),
                               rtol=1e-5)


def test_release_train_step_updates_weights_and_ema():
  torch.manual_seed(0)
  model = release.create_release_model(FAKE_RELEASE, 'secvit_t')
  step = release.ReleaseTrainStep(model, batch_size=4, mixing={**MIXING, 'num_classes': 1000},
                                  ema_decay=0.5)
  before = {k: v.clone() for k, v in model.state_dict().items()}
  loss = step(torch.randn(4, 3, 16, 16), torch.tensor([1, 2, 3, 4]))
  assert np.isfinite(loss)
  after = model.state_dict()
  assert not torch.equal(before['head.weight'], after['head.weight'])
  ema = step.ema.state_dict()
  decay = 0.5 ** (4 / 512)
  torch.testing.assert_close(ema['head.weight'],
                             decay * before['head.weight'] + (1 - decay) * after['head.weight'])
  assert int(ema['norm.num_batches_tracked']) == 1


def test_side_by_side_run_alternates_warm_workers_and_writes_the_table(tmp_path, capsys):
  output = tmp_path / 'throughput.json'
  baseline = tmp_path / 'baseline'  # Another tree of the project: here a copy of this one.
  root = pathlib.Path(__file__).parents[1]
  for part in ('secvit_jax', 'configs'):
    shutil.copytree(root / part, baseline / part, ignore=shutil.ignore_patterns('__pycache__'))
  throughput.main(['--release', FAKE_RELEASE, '--baseline', str(baseline),
                   '--variants', 'secvit_t', '--modes', 'forward',
                   '--batch', '2', '--size', '32', '--repeats', '3', '--warmup', '1',
                   '--threads', '1', '--model-overrides', '{"depths": [1, 1, 1, 1]}',
                   '--json', str(output)])
  report = json.loads(output.read_text())
  assert report['command'].startswith('python -m benchmarks.throughput --release')
  assert set(report['sides']) == {'project', 'baseline', 'release'}
  for side in report['sides'].values():
    assert side['threads'] == 1 and len(side['cpus']) == 1
  assert report['sides']['project']['cpus'] == report['sides']['release']['cpus']
  assert report['sides']['baseline']['package'] == str(baseline / 'secvit_jax')
  assert report['sides']['project']['package'] == str(root / 'secvit_jax')
  (entry,) = report['results']
  for side in ('project', 'baseline', 'release'):
    assert len(entry[side]['times_s']) == 3
    assert entry[side]['min_s'] == min(entry[side]['times_s'])
    assert entry[side]['images_per_s'] == pytest.approx(2 / entry[side]['min_s'])
  for side in ('baseline', 'release'):
    assert entry[f'ratio_{side}'] == pytest.approx(
        entry['project']['images_per_s'] / entry[side]['images_per_s'])
  out = capsys.readouterr().out
  assert '| variant | mode | batch | size | dtype | project img/s | baseline img/s |' in out
  assert '| secvit_t | forward | 2 | 32 | float32 |' in out
  assert report['sides']['baseline']['revision'] is None  # The copy is no git checkout.
  section = readme_table.throughput_section(report)
  assert f"'before' is this project at {baseline / 'secvit_jax'}" in section
  assert '| img/s | before img/s | vs before | release img/s | vs release |' in section


def test_a_failing_worker_reports_its_error(tmp_path):
  with pytest.raises(RuntimeError, match='release worker failed in start'):
    throughput.Worker('release', threads=1, checkout=str(tmp_path))


def test_gpu_script_times_the_einsum_attention_at_toy_sizes_and_skips_cudnn_here():
  rows = gpu.attention_timings(batch=1, dtype='bfloat16', with_cudnn=False, repeats=1, scale=8)
  assert [row['stage'] for row in rows] == [0, 1, 2, 3]
  for row in rows:
    assert row['einsum_forward_ms'] > 0 and row['einsum_forward_backward_ms'] > 0
    assert 'cudnn_forward_ms' not in row and row['shape'][-1] == gpu.HEAD_DIM
  assert rows[0]['shape'] == [1, 2, 32, 1, 32]  # 49 tokens of stage 0 (56 / 8 per side).
