"""Shared fixtures: the release's golden fixture and the reduced SecViT it was made with; and what
the end-to-end tests of the three tasks share to run `train.py` in subprocesses."""

import json
import os
import signal
import subprocess
import sys

# The dev requirements install libtpu (for benchmarks/tpu_compile.py); without this every test
# process, subprocesses included, would try to start a TPU runtime on a machine that has none.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=wrong-import-position

from secvit_jax import model as model_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTDATA = os.path.join(os.path.dirname(__file__), 'testdata')
GOLDEN_NPZ = os.path.join(TESTDATA, 'secvit_tiny_golden.npz')
GOLDEN_PTH = os.path.join(TESTDATA, 'secvit_tiny_official_layout.pth')


@pytest.fixture(scope='session')
def golden():
  """The release's golden fixture, as a dict of NumPy arrays: the release's own model, reduced
  ('config_json': its constructor arguments), its state dict ('param/<key>'), and for a square
  (2×3×64×64) and a wide (1×3×64×96) input ('square/…', 'wide/…'): the NCHW input, logits, each
  stage's output after its downsample and stage 0 block 0's sort permutation, in eval mode."""
  with np.load(GOLDEN_NPZ) as data:
    return {key: data[key] for key in data.files}


@pytest.fixture(scope='session')
def golden_model(golden):
  """The reduced SecViT of the golden fixture, from the release constructor's arguments."""
  config = json.loads(str(golden['config_json']))
  clusters = [per_block[0] for per_block in config['num_clusterss']]
  assert all(len(set(per_block)) == 1 for per_block in config['num_clusterss'])
  return model_lib.SecViT(
      num_classes=config['num_classes'], embed_dims=tuple(config['embed_dims']),
      depths=tuple(config['depths']), num_heads=tuple(config['num_heads']),
      num_clusters=tuple(clusters), layer_scales=tuple(config['layerscales']),
      mlp_ratio=config['mlp_ratios'][0], projection=config['projection'],
      drop_path_rate=config['drop_path_rate'])


@pytest.fixture(scope='session')
def golden_state_dict(golden):
  """The fixture's weights as a release state dict: key -> NumPy array."""
  return {key.removeprefix('param/'): value for key, value in golden.items()
          if key.startswith('param/')}


# The golden model as overrides of secvit_t: what `python -m secvit_jax.convert --variant secvit_t
# --model.<field>=<value> ...` records for it.
GOLDEN_OVERRIDES_OF_SECVIT_T = {
    'embed_dims': (32, 64, 96, 128), 'depths': (1, 2, 2, 1), 'num_heads': (2, 4, 4, 8),
    'num_clusters': (4, 2, 2, -1), 'layer_scales': (False, False, True, True), 'projection': 64,
    'drop_path_rate': 0.0}


@pytest.fixture(scope='session')
def golden_checkpoint(tmp_path_factory):
  """The golden fixture's weights converted (as secvit_t with overrides, evaluated at 64×64)."""
  from secvit_jax import convert  # pylint: disable=g-import-not-at-top
  directory = tmp_path_factory.mktemp('golden') / 'converted'
  convert.convert_checkpoint(GOLDEN_PTH, str(directory), variant='secvit_t',
                             model_overrides=GOLDEN_OVERRIDES_OF_SECVIT_T, image_size=64)
  return str(directory)


# ------------------------------------------------------------------------------------------------
# End to end: train.py in subprocesses.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def environment(tmp_path_factory):
  """Subprocess environment of a test module's runs: CPU only, quick to compile, and one
  persistent compilation cache, so that a program compiled by one run loads in the others."""
  return dict(
      os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_backend_optimization_level=0',
      JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp('xla_cache')),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')


@pytest.fixture(scope='module')
def scenes(tmp_path_factory):
  """Where a dense-task module's runs write their digit scenes once (`--config.data_dir`)."""
  return str(tmp_path_factory.mktemp('data') / 'scenes')


def start(environment, *args, devices=None, **env):
  """Starts `python ARGS` (e.g. 'train.py', flags...) in the checkout with `environment`, `env`
  added and, with `devices`, that many host devices; stderr is piped (text)."""
  env = dict(environment, **env)
  if devices:
    env['XLA_FLAGS'] += f' --xla_force_host_platform_device_count={devices}'
  return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stderr=subprocess.PIPE,
                          text=True)


def finish(process, returncode=0):
  """Waits for `process`; returns its stderr after checking its exit status."""
  _, log = process.communicate(timeout=600)
  assert process.returncode == returncode, log[-5000:]
  return log


def read_jsonl(path):
  """The JSON objects of a .jsonl file (metrics.jsonl, evaluations.jsonl)."""
  with open(path) as f:
    return [json.loads(line) for line in f]


def checkpoint_steps(workdir):
  """The steps of the training checkpoints in `workdir`, in order."""
  return sorted(int(name) for name in os.listdir(os.path.join(workdir, 'checkpoints'))
                if name.isdigit())


def stop_once_training_starts(process, workdir, total_steps):
  """Sends SIGTERM to a started train.py run (`start`) once its loop is about to start and
  waits for it to save and exit (status 143); returns the step of the one checkpoint it left in
  `workdir`, which must lie inside the run's `total_steps`."""
  log = []
  for line in process.stderr:
    log.append(line)
    if 'training from step 0' in line:
      process.send_signal(signal.SIGTERM)
      break
  log.append(finish(process, returncode=143))
  stopped_at = checkpoint_steps(workdir)
  assert len(stopped_at) == 1 and 0 < stopped_at[0] < total_steps, ''.join(log)
  return stopped_at[0]


def assert_resumed_bit_equal(workdir, reference, log, stopped_at, total_steps, metric):
  """A train.py run stopped at step `stopped_at` and resumed in `workdir` (`log`: the resumed
  run's output) said where it resumed, and ended with the uninterrupted `reference` run's
  variables and evaluation (its metrics.jsonl entries at `total_steps` that hold `metric`), bit
  for bit."""
  import jax  # pylint: disable=g-import-not-at-top
  import secvit_jax  # pylint: disable=g-import-not-at-top
  assert f'resuming from {workdir}/checkpoints at step {stopped_at}' in log
  jax.tree.map(np.testing.assert_array_equal, secvit_jax.load_variables(str(workdir)),
               secvit_jax.load_variables(str(reference)))
  final, expected = ([m for m in read_jsonl(os.path.join(run, 'metrics.jsonl'))
                      if m['step'] == total_steps and metric in m] for run in (workdir, reference))
  assert final == expected


def zero_variables(task):
  """The variables of `task`'s model, every value 0, made without compiling: a target for
  `task.load_pretrained`."""
  import jax  # pylint: disable=g-import-not-at-top
  model = task.create_model()
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *task.init_inputs(), train=False))
  return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)


def random_classifier(model_config, image_size, num_classes=7, seed=0):
  """Variables of a classifier of `model_config`'s SecViT (a config's `model`) with its own head
  of `num_classes`, every value drawn from a normal distribution (so each is distinct), made
  without compiling: what a dense task's `init_from` loads its backbone from."""
  import jax  # pylint: disable=g-import-not-at-top
  fields = {key: tuple(value) if isinstance(value, list) else value
            for key, value in model_config.items() if key not in ('name', 'tokens_per_cluster')}
  classifier = model_lib.create_model('secvit_t', num_classes=num_classes, **fields)
  shapes = jax.eval_shape(lambda: classifier.init(
      jax.random.key(0), np.zeros((1, image_size, image_size, 3)), train=False))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype), shapes)
