"""Training end to end: `train.py` runs of a tiny SecViT on the digits, in subprocesses.

The runs share a persistent XLA compilation cache, so a program compiled by one run (the reference
run's train and eval steps) loads in the others. The reference run also serves as the
uninterrupted run of the resume test and as the one-device run of the multi-device tests.
"""

import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

import secvit_jax
from secvit_jax import checkpoints
from secvit_jax import model as model_lib
from secvit_jax import train_lib
from secvit_jax.data import sources
from secvit_jax.tasks import classification

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 24
# configs/demo.py shrunk to one stage of one clustered block, batches of 16 and 24 steps: the
# runs spend their time compiling, and this compiles in a fraction of the time.
TINY = (
    '--config=configs/demo.py',
    '--config.model.embed_dims=(16,)',
    '--config.model.depths=(1,)',
    '--config.model.num_heads=(2,)',
    '--config.model.num_clusters=(4,)',
    '--config.model.projection=32',
    '--config.model.drop_path_rate=0.1',
    '--config.batch_size=16',
    '--config.eval_batch_size=120',
    '--config.optimizer.base_lr=0.2',
    # Adam divides rounding noise in the gradients of parameters whose exact gradient is zero
    # (a bias before BatchNorm, the key bias) by its own size, making full-size steps that
    # differ between meshes; a larger epsilon keeps those steps small.
    '--config.optimizer.eps=1e-3',
    f'--config.total_steps={TOTAL_STEPS}',
    '--config.optimizer.warmup_steps=2',
    '--config.input.random_resized_crop=False',
    '--config.eval_every_steps=12',
    '--config.checkpoint_every_steps=12',
    '--config.log_every_steps=1',
)
# For runs compared by their parameters alone.
ONLY_FINAL_EVAL = f'--config.eval_every_steps={TOTAL_STEPS}'
# Across meshes and processes the sums run in another order: the parameters agree to rounding,
# amplified a little by 24 Adam steps.
ATOL = 2e-5

# Runs train.py with training batches that are a function of (seed, step) alone, whatever the
# process count (the input pipeline's depend on it), each process contributing its rows; from
# step $NAN_FROM_STEP on (if set) the images are NaN. Evaluation reads the digits as usual.
_STAND_IN_BATCHES = '''
import os, sys
import jax, numpy as np
from sklearn import datasets
from secvit_jax import cli, train
from secvit_jax.data import classification

class StandInData:
  def __init__(self, config):
    self._config = config
    self._digits = classification.ClassificationData(config)
    self.info = self._digits.info

  def eval_batches(self, sharding):
    return self._digits.eval_batches(sharding)

  def train_batches(self, sharding, start_step=0):
    config = self._config
    digits = datasets.load_digits()
    scale = config.image_size // 8
    images = np.kron(digits.images / 8.0 - 1.0, np.ones((scale, scale))).astype(np.float32)
    images = np.repeat(images[..., None], 3, axis=-1)
    labels = digits.target.astype(np.int32)
    nan_from = int(os.environ.get('NAN_FROM_STEP', 2**62))
    rows = config.batch_size // jax.process_count()
    mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
    step = start_step
    while True:
      chosen = np.random.default_rng([config.seed, step]).choice(len(labels), config.batch_size)
      batch = {'image': images[chosen] * (np.nan if step + 1 >= nan_from else 1.0),
               'label': labels[chosen]}
      yield {name: jax.make_array_from_process_local_data(sharding, value[mine], value.shape)
             for name, value in batch.items()}
      step += 1

def main(argv):
  train.main(argv, make_data=StandInData)

sys.argv = ['train.py'] + sys.argv[1:]
cli.run(main)
'''
STAND_IN = ('-c', _STAND_IN_BATCHES)


@pytest.fixture(scope='module')
def environment(tmp_path_factory):
  """Subprocess environment: CPU only, quick to compile, with a compilation cache shared by
  this module's runs."""
  return dict(
      os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_backend_optimization_level=0',
      JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp('xla_cache')),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')


def _start(environment, workdir, *flags, entry=('train.py',), devices=None, **env):
  """Starts train.py (or `entry`) on the tiny config in `workdir`; stderr is piped."""
  env = dict(environment, **env)
  if devices:
    env['XLA_FLAGS'] += f' --xla_force_host_platform_device_count={devices}'
  return subprocess.Popen([sys.executable, *entry, *TINY, f'--workdir={workdir}', *flags],
                          cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)


def _finish(process, returncode=0):
  """Waits for `process`; returns its stderr after checking its exit status."""
  _, log = process.communicate(timeout=600)
  assert process.returncode == returncode, log[-5000:]
  return log


def _train(environment, workdir, *flags, returncode=0, **kwargs):
  return _finish(_start(environment, workdir, *flags, **kwargs), returncode)


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _evaluations(workdir):
  with open(os.path.join(workdir, 'evaluations.jsonl')) as f:
    return [json.loads(line) for line in f]


def _checkpoint_steps(workdir):
  return sorted(int(name) for name in os.listdir(os.path.join(workdir, 'checkpoints'))
                if name.isdigit())


def _assert_trees_close(actual, expected, atol):
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=0, atol=atol), actual, expected)


def _assert_trees_equal(actual, expected):
  jax.tree.map(np.testing.assert_array_equal, actual, expected)


@pytest.fixture(scope='module')
def reference(environment, tmp_path_factory):
  """The workdir of an uninterrupted run on one device."""
  workdir = tmp_path_factory.mktemp('reference')
  _train(environment, workdir)
  return workdir


# ------------------------------------------------------------------------------------------------
# One run: metrics, checkpoints, loss.
# ------------------------------------------------------------------------------------------------


def test_training_writes_metrics_and_checkpoints_and_the_loss_falls(reference):
  metrics = _metrics(reference)
  train = [m for m in metrics if 'train/loss' in m]
  assert [m['step'] for m in train] == list(range(1, TOTAL_STEPS + 1))
  first, last = (np.mean([m['train/loss'] for m in part]) for part in (train[:4], train[-4:]))
  assert last < first - 0.08, (first, last)
  assert all(m['train/lr'] > 0 and m['train/grad_norm'] > 0 for m in train)
  evals = [m for m in metrics if 'eval/top1' in m]
  assert [m['step'] for m in evals] == [12, 24]
  for prefix in ('eval', 'eval_ema'):
    assert 0 <= evals[-1][f'{prefix}/top1'] <= evals[-1][f'{prefix}/top5'] <= 1
    assert evals[-1][f'{prefix}/loss'] > 0

  assert _checkpoint_steps(reference) == [12, 24]
  assert os.listdir(os.path.join(reference, 'tensorboard'))
  with open(os.path.join(reference, 'config.json')) as f:
    assert json.load(f)['total_steps'] == TOTAL_STEPS

  model, ema = (secvit_jax.load_variables(str(reference), ema=ema) for ema in (False, True))
  assert set(model) == {'params', 'batch_stats'}
  at_12 = secvit_jax.load_variables(str(reference / 'checkpoints'), step=12)
  assert not np.array_equal(model['params']['head']['kernel'], at_12['params']['head']['kernel'])
  assert not np.array_equal(model['params']['head']['kernel'], ema['params']['head']['kernel'])


def test_the_workdir_says_what_model_it_holds(reference):
  info = checkpoints.read_model_info(str(reference))
  assert (info.variant, info.num_classes, info.image_size, info.class_names) == (
      'secvit_t', 10, 32, tuple('0123456789'))
  assert info.model_overrides['depths'] == [1] and info.model_overrides['projection'] == 32
  model, variables = secvit_jax.load_model(str(reference), step=12, ema=True)
  assert (model.depths, model.num_clusters, model.num_classes) == ((1,), (4,), 10)
  jax.tree.map(np.testing.assert_array_equal, variables,
               secvit_jax.load_variables(str(reference), step=12, ema=True))


# ------------------------------------------------------------------------------------------------
# Preemption and resumption.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('stop_signal, status', [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_saves_and_the_resumed_run_ends_bit_equal(environment, reference, tmp_path,
                                                                stop_signal, status):
  process = _start(environment, tmp_path)
  log = []
  for line in process.stderr:  # The signal once the loop is about to start.
    log.append(line)
    if 'training from step 0' in line:
      process.send_signal(stop_signal)
      break
  log.append(_finish(process, returncode=status))
  [stopped_at] = _checkpoint_steps(tmp_path)
  assert 0 < stopped_at < TOTAL_STEPS
  assert (f'stopped by {signal.Signals(stop_signal).name}: saved the checkpoint of step '
          f'{stopped_at}') in ''.join(log)
  assert 'Traceback' not in ''.join(log)

  log = _train(environment, tmp_path)
  assert f'resuming from {tmp_path}/checkpoints at step {stopped_at}' in log
  for ema in (False, True):
    _assert_trees_equal(secvit_jax.load_variables(str(tmp_path), ema=ema),
                        secvit_jax.load_variables(str(reference), ema=ema))
  train_steps = [m['step'] for m in _metrics(tmp_path) if 'train/loss' in m]
  assert train_steps == list(range(1, TOTAL_STEPS + 1))


def test_a_second_ctrl_c_stops_at_once(environment, tmp_path):
  process = _start(environment, tmp_path)
  log = []
  for line in process.stderr:  # Both while the first step compiles.
    log.append(line)
    if 'training from step 0' in line:
      process.send_signal(signal.SIGINT)
      break
  for line in process.stderr:
    log.append(line)
    if 'saving a checkpoint after the current step' in line:
      process.send_signal(signal.SIGINT)
      break
  log.append(_finish(process, returncode=130))
  log = ''.join(log)
  assert 'second Ctrl-C: stopping now, without saving' in log
  assert 'compiled and ran the first step' not in log  # It did not wait for the compilation.
  assert 'Traceback' not in log and 'Fatal Python error' not in log


# ------------------------------------------------------------------------------------------------
# Meshes and processes.
# ------------------------------------------------------------------------------------------------


def test_eight_devices_match_one(environment, reference, tmp_path):
  meshes = {'data8': (8, 1), 'data2_fsdp4': (2, 4)}
  runs = {name: _start(environment, tmp_path / name, f'--config.mesh.data={data}',
                       f'--config.mesh.fsdp={fsdp}', ONLY_FINAL_EVAL, devices=8)
          for name, (data, fsdp) in meshes.items()}
  expected = secvit_jax.load_variables(str(reference))
  for name, process in runs.items():
    log = _finish(process)
    assert f"8 devices, mesh {{'data': {meshes[name][0]}, 'fsdp': {meshes[name][1]}}}" in log
    _assert_trees_close(secvit_jax.load_variables(str(tmp_path / name)), expected, ATOL)


@pytest.fixture(scope='module')
def stand_in_reference(environment, tmp_path_factory):
  """A run of one process on the stand-in batches."""
  workdir = tmp_path_factory.mktemp('stand_in')
  _train(environment, workdir, entry=STAND_IN)
  return workdir


def test_two_processes_match_one(environment, stand_in_reference, tmp_path):
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    port = probe.getsockname()[1]
  processes = [
      _start(environment, tmp_path, '--distributed', f'--coordinator_address=127.0.0.1:{port}',
             '--num_processes=2', f'--process_id={index}', ONLY_FINAL_EVAL, entry=STAND_IN,
             JAX_COORDINATOR_BIND_ADDRESS=f'127.0.0.1:{port}')
      for index in range(2)]
  logs = [_finish(process) for process in processes]
  assert "2 processes, 2 devices, mesh {'data': 2, 'fsdp': 1}" in logs[0]
  _assert_trees_close(secvit_jax.load_variables(str(tmp_path)),
                      secvit_jax.load_variables(str(stand_in_reference)), ATOL)


# ------------------------------------------------------------------------------------------------
# Pretrained initialization, failures, config errors.
# ------------------------------------------------------------------------------------------------


def test_init_from_a_checkpoint_with_other_classes_replaces_the_head(environment, reference,
                                                                   tmp_path):
  other = secvit_jax.load_variables(str(reference))
  other['params']['head'] = {'kernel': np.ones((32, 7), np.float32),
                             'bias': np.ones((7,), np.float32)}
  checkpoints.save_variables(str(tmp_path / 'seven'), other, {'num_classes': 7})
  log = _train(environment, tmp_path / 'run', f'--config.init_from={tmp_path / "seven"}',
               '--config.eval_only=True')
  assert 'newly initialized (shape differs): params/head/bias (10,) (checkpoint (7,))' in log
  [evaluation] = _evaluations(tmp_path / 'run')
  assert evaluation['step'] == 0 and 0 <= evaluation['eval/top1'] <= 1
  assert evaluation['checkpoint'] == str(tmp_path / 'seven')
  assert 'eval_ema/top1' not in evaluation  # The EMA would be the same weights.
  assert sorted(os.listdir(tmp_path / 'run')) == ['evaluations.jsonl']


def test_eval_only_keeps_its_results_apart_from_training(environment, reference, tmp_path):
  workdir = tmp_path / 'copy'
  shutil.copytree(reference, workdir)
  log = _train(environment, workdir, '--config.eval_only=True')
  assert f'evaluating the checkpoint of step {TOTAL_STEPS} in {workdir}/checkpoints' in log
  assert 'resuming' not in log
  [evaluation] = _evaluations(workdir)
  [trained] = [m for m in _metrics(reference) if m['step'] == TOTAL_STEPS and 'eval/top1' in m]
  assert evaluation['step'] == TOTAL_STEPS
  assert evaluation['eval_ema/top1'] == trained['eval_ema/top1']
  for name in ('metrics.jsonl', 'config.json'):  # Untouched.
    assert (workdir / name).read_bytes() == (reference / name).read_bytes()
  assert _checkpoint_steps(workdir) == _checkpoint_steps(reference)


def test_eval_only_with_nothing_to_evaluate_is_one_line_and_leaves_no_files(environment,
                                                                            tmp_path):
  log = _train(environment, tmp_path / 'empty', '--config.eval_only=True', returncode=2)
  assert f'eval_only: {tmp_path / "empty"} holds no checkpoint and config.init_from is not set' \
      in log
  assert 'Traceback' not in log
  assert not os.path.exists(tmp_path / 'empty')


def test_load_pretrained_names_what_does_not_fit():
  config = importlib.import_module('configs.demo').get_config()
  task = classification.ClassificationTask(config, sources.DatasetInfo(3, 10, 10))
  variables = {'params': {'head': {'bias': np.zeros(3)}, 'proj': {'bias': np.zeros(4)}}}
  merged, notes = task.load_pretrained(
      variables, {'params': {'head': {'bias': np.ones(5)}, 'proj': {'bias': np.ones(4)}}}, 'x')
  np.testing.assert_array_equal(merged['params']['proj']['bias'], np.ones(4))
  assert merged['params']['head']['bias'] is variables['params']['head']['bias']
  assert notes == ['newly initialized (shape differs): params/head/bias (3,) (checkpoint (5,))']
  with pytest.raises(ValueError, match=r'params/proj/bias has shape \(5,\), the model \(4,\); '
                     'params/extra is not in the model'):
    task.load_pretrained(variables, {
        'params': {'head': {'bias': np.ones(3)}, 'proj': {'bias': np.ones(5)},
                   'extra': np.ones(1)}}, 'x')


def test_a_non_finite_loss_stops_and_keeps_the_last_checkpoint(environment, stand_in_reference,
                                                            tmp_path):
  log = _train(environment, tmp_path, entry=STAND_IN, returncode=1, NAN_FROM_STEP='16')
  assert 'the training loss is nan' in log and 'at step 16: training stopped' in log
  assert _checkpoint_steps(tmp_path) == [12]
  for ema in (False, True):
    _assert_trees_equal(secvit_jax.load_variables(str(tmp_path), ema=ema),
                        secvit_jax.load_variables(str(stand_in_reference), step=12, ema=ema))


# ------------------------------------------------------------------------------------------------
# The recipe.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('variant', ['secvit_t', 'secvit_s', 'secvit_b', 'secvit_l'])
def test_variant_configs_follow_the_release(variant):
  config = importlib.import_module(f'configs.{variant}').get_config()
  assert config.model.name == variant
  assert config.model.drop_path_rate == model_lib.VARIANTS[variant]['drop_path_rate']
  durations = train_lib.durations_from_config(config, 1_281_167)
  assert durations.steps_per_epoch == 1251
  assert durations.total_steps == 300 * 1251 and durations.warmup_steps == 5 * 1251
  _, schedule = train_lib.create_optimizer(config, durations)
  np.testing.assert_allclose(schedule(0), 1e-6, rtol=1e-5)
  np.testing.assert_allclose(schedule(durations.warmup_steps), 1e-3, rtol=1e-5)
  np.testing.assert_allclose(schedule(durations.total_steps), 1e-5, rtol=1e-5)
  assert config.mixup.mixup_alpha == 0.8 and config.mixup.label_smoothing == 0.1


def test_weight_decay_spares_biases_and_norms_but_not_layer_scales():
  model = model_lib.create_model('secvit_b', depths=(1, 1, 1, 1), num_classes=10)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 64, 64, 3)))['params'])
  flat = {'/'.join(path): decays for path, decays in
          _flatten(train_lib.weight_decay_mask(shapes)).items()}
  assert flat['stage_2/block_0/gamma_1'] and flat['stage_3/block_0/gamma_2']
  assert flat['stage_0/block_0/attn/qkv/kernel'] and flat['stem/conv_0/kernel']
  assert flat['stage_0/block_0/pos/kernel']  # Depthwise (3, 3, 1, C).
  assert not flat['stage_0/block_0/attn/qkv/bias']
  assert not flat['stage_0/block_0/norm1/scale'] and not flat['stem/bn_0/scale']
  assert sum(flat.values()) == sum(len(shape.shape) > 1 for shape in jax.tree.leaves(shapes)) + 4


def test_weight_decay_rules_for_the_dense_recipes():
  params = {'conv': {'kernel': np.zeros((3, 3, 4, 8)), 'bias': np.zeros(8)},
            'bn': {'scale': np.zeros(8), 'bias': np.zeros(8)},
            'block': {'norm1': {'scale': np.zeros(8), 'bias': np.zeros(8)}}}
  not_norms = _flatten(train_lib.weight_decay_mask(params, 'not_norms'))
  assert not_norms == {('conv', 'kernel'): True, ('conv', 'bias'): True, ('bn', 'scale'): False,
                       ('bn', 'bias'): False, ('block', 'norm1', 'scale'): False,
                       ('block', 'norm1', 'bias'): False}
  assert all(_flatten(train_lib.weight_decay_mask(params, 'all')).values())
  with pytest.raises(ValueError, match="weight_decay_rule must be 'timm', 'not_norms' or 'all'"):
    train_lib.weight_decay_mask(params, 'none')


def test_poly_and_step_schedules_follow_mmcv():
  config = importlib.import_module('configs.demo').get_config()
  opt = config.optimizer
  opt.update(base_lr=6e-5, base_batch_size=config.batch_size, warmup_lr=6e-5 * 1e-6,
             min_lr=0.0, schedule='poly')
  opt.power = 1.0
  durations = train_lib.Durations(steps_per_epoch=10, total_steps=1000, warmup_steps=100,
                                  eval_every_steps=1, checkpoint_every_steps=1, log_every_steps=1)
  _, schedule = train_lib.create_optimizer(config, durations)
  # The warm-up multiplies the poly rate: factor (1e-6 + (1 - 1e-6) t / 100) up to t = 100.
  np.testing.assert_allclose(schedule(0), 6e-11, rtol=1e-4)
  np.testing.assert_allclose(schedule(50), 6e-5 * 0.95 * (1e-6 + (1 - 1e-6) * 0.5), rtol=1e-5)
  np.testing.assert_allclose(schedule(400), 6e-5 * 0.6, rtol=1e-5)
  np.testing.assert_allclose(schedule(1000), 0.0, atol=1e-12)
  opt.update(schedule='step', base_lr=1e-4, warmup_lr=1e-7)
  opt.decay_steps = (800, 950)
  opt.decay_factor = 0.1
  _, schedule = train_lib.create_optimizer(config, durations)
  np.testing.assert_allclose([schedule(0), schedule(100), schedule(799), schedule(800),
                              schedule(999)], [1e-7, 1e-4, 1e-4, 1e-5, 1e-6], rtol=1e-5)


def _flatten(tree, prefix=()):
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


class _TinyClassifier(nn.Module):
  """Dense · BatchNorm · Dense over flattened images: a stand-in for SecViT in step tests."""

  @nn.compact
  def __call__(self, images, train=False):
    x = nn.Dense(8)(images.reshape(images.shape[0], -1))
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(10)(x)


def test_with_accumulation_the_optimizer_and_the_ema_move_on_every_kth_step():
  config = importlib.import_module('configs.demo').get_config()
  config.batch_size, config.image_size = 4, 8
  config.optimizer.accumulation_steps = 2
  config.total_steps = 10
  durations = train_lib.durations_from_config(config, 100)
  model = _TinyClassifier()
  optimizer, schedule = train_lib.create_optimizer(config, durations)
  task = classification.ClassificationTask(config, sources.DatasetInfo(10, 100, 10))
  state = jax.jit(train_lib.make_init_fn(task, model, optimizer, config))()
  step = jax.jit(train_lib.make_train_step(task, model, optimizer, schedule, config))
  batch = {'image': jax.random.normal(jax.random.key(0), (4, 8, 8, 3)),
           'label': jax.numpy.arange(4)}
  kernel = lambda variables: np.asarray(variables['params']['Dense_1']['kernel'])
  after_one, _ = step(state, batch)
  np.testing.assert_array_equal(kernel(after_one.variables), kernel(state.variables))
  np.testing.assert_array_equal(kernel(after_one.ema_variables), kernel(state.ema_variables))
  after_two, _ = step(after_one, batch)
  assert not np.array_equal(kernel(after_two.variables), kernel(state.variables))
  decay = config.ema_decay ** (2 * config.batch_size / 512)
  np.testing.assert_allclose(
      kernel(after_two.ema_variables),
      decay * kernel(state.ema_variables) + (1 - decay) * kernel(after_two.variables),
      rtol=1e-6, atol=1e-7)
