"""The command line as a user meets it: one-line errors, --help, quiet start-up, TensorBoard."""

import ast
import json
import os
import pathlib
import subprocess
import sys
import types

from absl import flags
from ml_collections import config_flags
import numpy as np
from PIL import Image
import pytest

from secvit_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, 'train.py')
# A config of the `configs/` layout (a recipe in a sibling module) that loads without TensorFlow.
TOY_BASE = '''
import ml_collections

def recipe():
  return ml_collections.ConfigDict({
      'total_steps': 10, 'batch_size': 8,
      'optimizer': {'base_lr': 0.1, 'warmup_lr': 0.0, 'weight_decay': 0.05}})
'''
TOY = '''
from configs import toy_base

def get_config():
  return toy_base.recipe()
'''
# What a CPU run printed before: the TPU runtime probing for a TPU (libtpu installed), JAX's note
# that it found none, TensorFlow's start-up banners.
NOISE = ('Failed to find host bounds', 'unexpected worker hostname', 'Logging before InitGoogle',
         "Unable to initialize backend 'tpu'", 'libtpu', 'oneDNN custom operations',
         'absl::InitializeLog')


def _run(*args, cwd, timeout=300, **env):
  """Runs `python ARGS` in `cwd`; returns the completed process (text output)."""
  environment = dict(os.environ, **env)
  return subprocess.run([sys.executable, *args], cwd=cwd, env=environment, capture_output=True,
                        text=True, timeout=timeout)


@pytest.fixture
def toy_config(tmp_path):
  """TMP/configs/toy.py, importing TMP/configs/toy_base.py as `configs.toy_base`."""
  directory = tmp_path / 'configs'
  directory.mkdir()
  (directory / 'toy_base.py').write_text(TOY_BASE)
  (directory / 'toy.py').write_text(TOY)
  return directory / 'toy.py'


@pytest.fixture
def elsewhere(tmp_path):
  """An empty working directory outside the repository."""
  directory = tmp_path / 'elsewhere'
  directory.mkdir()
  return directory


def _assert_one_line_error(result, *expected):
  assert result.returncode == 1, result.stderr
  lines = result.stderr.splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith('train.py: error: '), lines
  for text in expected:
    assert text in lines[0]


# ------------------------------------------------------------------------------------------------
# Errors on the command line: one line, the nearest field, no files.
# ------------------------------------------------------------------------------------------------


def test_a_misspelt_top_level_field_is_one_line_naming_the_nearest_fields(elsewhere):
  result = _run(TRAIN, f'--config={REPO}/configs/demo.py', '--config.learning_rat=0.1',
                cwd=elsewhere)
  _assert_one_line_error(result, "configs/demo.py has no field 'learning_rat'",
                         'Did you mean --config.optimizer.base_lr')
  assert not os.listdir(elsewhere)


def test_a_misspelt_nested_field_names_the_field_it_meant(toy_config, elsewhere):
  result = _run(TRAIN, f'--config={toy_config}', '--config.optimizer.base_l=0.1', cwd=elsewhere)
  _assert_one_line_error(result, "has no field 'optimizer.base_l'",
                         'Did you mean --config.optimizer.base_lr?')
  assert not os.listdir(elsewhere)


def test_a_config_file_that_does_not_exist_is_one_line(elsewhere):
  result = _run(TRAIN, '--config=configs/nope.py', '--config.total_steps=3', cwd=elsewhere)
  _assert_one_line_error(result, 'no such file', str(elsewhere / 'configs' / 'nope.py'))
  assert not os.listdir(elsewhere)


def test_a_value_of_the_wrong_type_is_one_line(toy_config, elsewhere):
  result = _run(TRAIN, f'--config={toy_config}', '--config.total_steps=ten', cwd=elsewhere)
  _assert_one_line_error(result, '--config.total_steps=ten', 'invalid literal for int()')


def test_a_configs_directory_is_the_package_configs_only_while_its_file_loads(
    toy_config, monkeypatch):
  programs_own = types.ModuleType('configs')  # E.g. a checkout's configs/ on sys.path.
  monkeypatch.setitem(sys.modules, 'configs', programs_own)
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=flag_values)
  parser = cli._ConfigFileParser(flag_values['config'].parser)  # pylint: disable=protected-access
  config = parser.parse(str(toy_config))
  assert config.optimizer.base_lr == 0.1 and config.is_locked
  assert sys.modules['configs'] is programs_own and 'configs.toy_base' not in sys.modules


@pytest.mark.parametrize('typed, meant', [
    ('totl_steps', ['total_steps']),
    ('optimizer.base_l', ['optimizer.base_lr']),
    ('base_lr', ['optimizer.base_lr']),  # At another depth.
    ('weight_decay', ['optimizer.weight_decay']),
    ('learning_rate', ['optimizer.base_lr', 'optimizer.warmup_lr']),  # Abbreviated: lr.
    ('batch', ['batch_size', 'eval_batch_size']),  # Its words.
    ('zzz', []),
])
def test_the_nearest_fields_of_a_typo(typed, meant):
  fields = ['total_steps', 'total_epochs', 'batch_size', 'eval_batch_size', 'optimizer',
            'optimizer.base_lr', 'optimizer.warmup_lr', 'optimizer.weight_decay', 'ema_decay']
  assert cli._nearest_fields(typed, fields) == meant  # pylint: disable=protected-access


# ------------------------------------------------------------------------------------------------
# --help.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('command, flags', [
    ((TRAIN,), ('--config', '--workdir', '--[no]distributed')),
    (('-m', 'secvit_jax.train'), ('--config', '--workdir')),
    (('-m', 'benchmarks.tpu_compile'), ('--config', '--topology', '--json')),
])
def test_help_lists_the_flags_and_exits_0(command, flags):
  result = _run(*command, '--help', cwd=REPO)
  assert result.returncode == 0, result.stderr
  for flag in flags:
    assert f'  {flag}' in result.stdout
  assert not result.stderr


# The command-line programs.
PROGRAMS = sorted({*pathlib.Path(REPO, 'benchmarks').glob('*.py'),
                   *pathlib.Path(REPO, 'secvit_jax').glob('*.py')})


def _option_help(call: ast.Call) -> ast.expr | None:
  """The help text of an argparse `add_argument` or absl `DEFINE_*` call (None: not an option)."""
  if not isinstance(call.func, ast.Attribute):
    return None
  keywords = {keyword.arg: keyword.value for keyword in call.keywords}
  if call.func.attr == 'add_argument':
    return keywords.get('help', ast.Constant(''))
  position = {'define_config_flag': 1}.get(call.func.attr, 2)
  if call.func.attr.startswith('DEFINE_') or call.func.attr == 'define_config_flag':
    if len(call.args) > position:
      return call.args[position]
    return keywords.get('help', keywords.get('help_string', ast.Constant('')))
  return None


@pytest.mark.parametrize('path', PROGRAMS, ids=lambda path: f'{path.parent.name}/{path.name}')
def test_every_option_has_help(path):
  for node in ast.walk(ast.parse(path.read_text())):
    text = _option_help(node) if isinstance(node, ast.Call) else None
    if text is not None:
      # A name: a wrapper passing its caller's help on (checked at the caller).
      assert isinstance(text, (ast.JoinedStr, ast.Name)) or (
          isinstance(text, ast.Constant) and text.value.strip()), (
              f'{path.name}:{node.lineno}: an option without help')


# ------------------------------------------------------------------------------------------------
# A short CPU run: no start-up noise; TensorBoard reads its scalars.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def short_run(tmp_path_factory):
  """Two steps of a tiny SecViT on the digits, as a user starts it: JAX left to choose its
  platform (libtpu installed by the dev requirements), nothing quieted by the environment.
  Returns (workdir, stderr)."""
  workdir = tmp_path_factory.mktemp('short_run')
  env = {k: v for k, v in os.environ.items()
         if k not in ('JAX_PLATFORMS', 'TF_CPP_MIN_LOG_LEVEL', 'ALLOW_MULTIPLE_LIBTPU_LOAD')}
  env['XLA_FLAGS'] = '--xla_backend_optimization_level=0'  # Compiles faster.
  result = subprocess.run(
      [sys.executable, TRAIN, '--config=configs/demo.py', '--config.model.embed_dims=(16,)',
       '--config.model.depths=(1,)', '--config.model.num_heads=(2,)',
       '--config.model.num_clusters=(4,)', '--config.model.projection=32',
       '--config.batch_size=16', '--config.total_steps=2', '--config.log_every_steps=1',
       f'--workdir={workdir}'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-5000:]
  return workdir, result.stderr


def test_a_cpu_run_prints_no_start_up_noise(short_run):
  _, stderr = short_run
  for noise in NOISE:
    assert noise not in stderr, stderr
  assert stderr.count('training from step 0 to 2') == 1, stderr  # Its own log, once.


def test_predict_and_visualize_start_quietly(short_run, tmp_path):
  """Their first look at the checkpoint (etils asks whether TensorFlow is installed) comes
  before TensorFlow's import: its banners stay filtered all the same."""
  workdir, _ = short_run
  image = tmp_path / 'digit.png'
  Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(image)
  env = {k: v for k, v in os.environ.items()
         if k not in ('JAX_PLATFORMS', 'TF_CPP_MIN_LOG_LEVEL', 'ALLOW_MULTIPLE_LIBTPU_LOAD')}
  for command in (['-m', 'secvit_jax.predict', str(workdir), str(image)],
                  ['-m', 'secvit_jax.visualize', str(workdir), str(image),
                   f'--out={tmp_path / "clusters.png"}']):
    result = subprocess.run([sys.executable, *command], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    for noise in NOISE:
      assert noise not in result.stderr, (command, result.stderr)


def test_tensorboard_reads_the_scalars_of_a_run(short_run):
  pytest.importorskip('tensorboard', reason='the viewer, in requirements.txt')
  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  # pylint: enable=g-import-not-at-top
  workdir, _ = short_run
  events = event_accumulator.EventAccumulator(str(workdir / 'tensorboard'),
                                              size_guidance={event_accumulator.TENSORS: 0})
  events.Reload()
  losses = {event.step: float(tensor_util.make_ndarray(event.tensor_proto))
            for event in events.Tensors('train/loss')}
  with open(workdir / 'metrics.jsonl') as f:
    expected = {m['step']: m['train/loss'] for m in map(json.loads, f) if 'train/loss' in m}
  assert sorted(losses) == sorted(expected) == [1, 2]
  np.testing.assert_allclose([losses[s] for s in (1, 2)], [expected[s] for s in (1, 2)],
                             rtol=1e-6)
  assert 'eval/top1' in events.Tags()['tensors']
