"""Classification end to end: `train.py` runs of a tiny SecViT on the digits, in subprocesses
(the trainer's unit tests: test_train_lib.py).

The runs share a persistent XLA compilation cache, so a program compiled by one run (the reference
run's train and eval steps) loads in the others. The reference run also serves as the
uninterrupted run of the resume test and as the one-device run of the multi-device tests.
"""

import json
import os
import shutil
import signal
import socket

import jax
import numpy as np
import pytest

import secvit_jax
from secvit_jax import checkpoints
from tests import conftest

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


def _start(environment, workdir, *flags, entry=('train.py',), **kwargs):
  """Starts train.py (or `entry`) on the tiny config in `workdir`; stderr is piped."""
  return conftest.start(environment, *entry, *TINY, f'--workdir={workdir}', *flags, **kwargs)


def _train(environment, workdir, *flags, returncode=0, **kwargs):
  return conftest.finish(_start(environment, workdir, *flags, **kwargs), returncode)


def _metrics(workdir):
  return conftest.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))


def _evaluations(workdir):
  return conftest.read_jsonl(os.path.join(workdir, 'evaluations.jsonl'))


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

  assert conftest.checkpoint_steps(reference) == [12, 24]
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
  log.append(conftest.finish(process, returncode=status))
  [stopped_at] = conftest.checkpoint_steps(tmp_path)
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
  log.append(conftest.finish(process, returncode=130))
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
    log = conftest.finish(process)
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
  logs = [conftest.finish(process) for process in processes]
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
  assert conftest.checkpoint_steps(workdir) == conftest.checkpoint_steps(reference)


def test_eval_only_with_nothing_to_evaluate_is_one_line_and_leaves_no_files(environment,
                                                                            tmp_path):
  log = _train(environment, tmp_path / 'empty', '--config.eval_only=True', returncode=2)
  assert f'eval_only: {tmp_path / "empty"} holds no checkpoint and config.init_from is not set' \
      in log
  assert 'Traceback' not in log
  assert not os.path.exists(tmp_path / 'empty')


def test_a_non_finite_loss_stops_and_keeps_the_last_checkpoint(environment, stand_in_reference,
                                                            tmp_path):
  log = _train(environment, tmp_path, entry=STAND_IN, returncode=1, NAN_FROM_STEP='16')
  assert 'the training loss is nan' in log and 'at step 16: training stopped' in log
  assert conftest.checkpoint_steps(tmp_path) == [12]
  for ema in (False, True):
    _assert_trees_equal(secvit_jax.load_variables(str(tmp_path), ema=ema),
                        secvit_jax.load_variables(str(stand_in_reference), step=12, ema=ema))
