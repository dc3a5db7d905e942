"""The package installs, editable and as a wheel, and its commands run from any directory.

Each install goes into a fresh virtual environment that sees this environment's site-packages
through a .pth file, from a copy of the repository's files (pip writes build files into the
source tree), without network: no dependencies, no build isolation (setuptools comes from this
environment).
"""

import os
import pathlib
import shutil
import subprocess
import sys
import tomllib

from packaging import requirements
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
with open(REPO / 'pyproject.toml', 'rb') as _f:
  PYPROJECT = tomllib.load(_f)
COMMANDS = sorted(PYPROJECT['project']['scripts'])


@pytest.fixture(scope='module', params=['editable', 'wheel'])
def installed(request, tmp_path_factory):
  """(venv directory, source copy, an empty working directory elsewhere)."""
  root = tmp_path_factory.mktemp(request.param)
  source = root / 'source'  # What the build reads, and the configs.
  for directory in ('secvit_jax', 'configs'):
    shutil.copytree(REPO / directory, source / directory,
                    ignore=shutil.ignore_patterns('__pycache__'))
  for path in (*REPO.glob('requirements*.txt'), REPO / 'pyproject.toml', REPO / 'README.md'):
    shutil.copy(path, source)
  venv = root / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', venv], check=True)
  purelib = subprocess.run(
      [venv / 'bin' / 'python', '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'],
      check=True, capture_output=True, text=True).stdout.strip()
  pathlib.Path(purelib, 'outer_environment.pth').write_text(''.join(
      f'{path}\n' for path in sys.path
      if os.path.basename(path) in ('site-packages', 'dist-packages')))
  editable = ['--editable'] if request.param == 'editable' else []
  result = subprocess.run(
      [sys.executable, '-m', 'pip', '--python', venv / 'bin' / 'python', 'install', '--quiet',
       '--no-deps', '--no-build-isolation', '--no-index', *editable, source],
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  elsewhere = root / 'elsewhere'
  elsewhere.mkdir()
  return venv, source, elsewhere


def _run(command, cwd, timeout=300):
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout)


@pytest.mark.parametrize('command', COMMANDS)
def test_every_command_shows_its_help_from_another_directory(installed, command):
  venv, _, elsewhere = installed
  result = _run([venv / 'bin' / command, '--help'], elsewhere)
  assert result.returncode == 0, result.stderr
  assert '--' in result.stdout and not result.stderr


def test_python_dash_m_works_from_another_directory(installed):
  venv, _, elsewhere = installed
  result = _run([venv / 'bin' / 'python', '-m', 'secvit_jax.convert', '--help'], elsewhere)
  assert result.returncode == 0, result.stderr
  assert '--variant' in result.stdout


def test_training_reads_a_checkout_config_from_another_directory(installed):
  venv, source, elsewhere = installed
  # The config loads (configs/demo.py imports configs/common.py) when its field is overridden:
  # a misspelt one makes that the whole run.
  result = _run([venv / 'bin' / 'secvit-train', f'--config={source}/configs/demo.py',
                 '--config.optimizer.base_l=0.1'], elsewhere)
  assert result.returncode == 1
  assert result.stderr.strip().endswith('Did you mean --config.optimizer.base_lr?'), result.stderr
  assert not os.listdir(elsewhere)


def test_the_installed_package_has_its_data_files_and_no_configs_package(installed):
  venv, source, elsewhere = installed
  result = _run([venv / 'bin' / 'python', '-c', (
      'import importlib.util, os, secvit_jax\n'
      'print(os.path.dirname(secvit_jax.__file__))\n'
      'print(importlib.util.find_spec("configs"))')], elsewhere)
  assert result.returncode == 0, result.stderr
  package, configs = result.stdout.split()
  assert configs == 'None'
  data_files = [path.relative_to(source / 'secvit_jax')
                for path in (source / 'secvit_jax').rglob('*')
                if path.is_file() and path.suffix not in ('.py', '.pyc')]
  assert pathlib.PurePath('cpu_kernels.cc') in data_files
  for path in data_files:
    assert (pathlib.Path(package) / path).is_file(), path


def test_the_dependencies_are_the_requirements_files(installed):
  venv, source, elsewhere = installed
  result = _run([venv / 'bin' / 'python', '-c', (
      'import importlib.metadata\n'
      'print("\\n".join(importlib.metadata.requires("secvit_jax")))')], elsewhere)
  assert result.returncode == 0, result.stderr
  declared = {requirements.Requirement(line) for line in result.stdout.splitlines()}

  def read(name, extra=None):
    lines = (line.split('#')[0].strip() for line in (source / name).read_text().splitlines())
    return {requirements.Requirement(line + (f'; extra == "{extra}"' if extra else ''))
            for line in lines if line}

  expected = (read('requirements.txt') | read('requirements-convert.txt', 'convert') |
              read('requirements-convert.txt', 'dev') | read('requirements-test.txt', 'dev') |
              read('requirements-export.txt', 'export') | read('requirements-export.txt', 'dev') |
              read('requirements-tpu.txt', 'tpu'))
  assert {str(r) for r in declared} == {str(r) for r in expected}
