r"""Trains SecViT: `secvit-train --config=configs/secvit_s.py [--workdir=DIR]`.

The same as `python train.py ...` in a checkout, or `python -m secvit_jax.train ...`. Any config
field can be overridden with `--config.FIELD=VALUE` (e.g. `--config.total_steps=1000`,
`--config.optimizer.base_lr=1e-3`); an unknown field or a wrong type is an error naming it.
Without --workdir the run goes to ./workdirs/<config name>. A run resumes from the newest
checkpoint of its workdir. On several hosts (a TPU pod slice) run the same command on every host
with --distributed.
"""

# This module is the command's one definition of its flags, inside the package so that the
# installed `secvit-train` has it; the checkout's top-level train.py only calls `run`. Config
# files are read by path, with their `configs` directory as the package `configs` (see
# `secvit_jax.cli`). It imports nothing heavy at the top: a mistyped command line fails within a
# second or two, and the huge-page restart comes before JAX and TensorFlow load.

from __future__ import annotations

import logging as python_logging
import os
import sys
from typing import Callable

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from secvit_jax import cli
from secvit_jax import host_memory

_CONFIG = cli.define_config_flag('config', 'Training config file, e.g. configs/secvit_s.py.')
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Directory for checkpoints and metrics (default ./workdirs/NAME).')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False,
    'Call jax.distributed.initialize() first (several processes; on TPU VMs and other '
    'supported clusters it finds its peers by itself).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'With --distributed: HOST:PORT of process 0 (else detected).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'With --distributed: the process count (else detected).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'With --distributed: this process (else detected).')

flags.mark_flags_as_required(['config'])


class _WarningsOnlyFrom(python_logging.Filter):
  """Drops INFO records logged from files under `directory` (orbax reports every save step)."""

  def __init__(self, directory: str):
    super().__init__()
    self._directory = directory

  def filter(self, record: python_logging.LogRecord) -> bool:
    return record.levelno >= python_logging.WARNING or self._directory not in record.pathname


def main(argv, make_data: Callable | None = None):
  """Runs `train_lib.train_and_evaluate` on the flags; `make_data(config)`, if given, makes the
  data (a `secvit_jax.data.pipeline.Data`) instead of the task (tests feed their own batches)."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # pylint: disable=g-import-not-at-top
  import jax
  import orbax.checkpoint as ocp
  from secvit_jax import monitoring
  from secvit_jax import train_lib
  # pylint: enable=g-import-not-at-top
  logging.get_absl_handler().addFilter(_WarningsOnlyFrom(os.path.dirname(ocp.__file__)))
  if _DISTRIBUTED.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  workdir = _WORKDIR.value or os.path.join('workdirs', os.path.splitext(
      os.path.basename(config_flags.get_config_filename(flags.FLAGS['config'])))[0])
  config = _CONFIG.value
  try:
    train_lib.train_and_evaluate(config, workdir, make_data(config) if make_data else None)
  except train_lib.ConfigError as error:
    logging.error('%s', error)
    sys.exit(2)
  except monitoring.NonFiniteLossError as error:
    logging.error('%s', error)
    sys.exit(1)
  except monitoring.Stopped as stopped:
    logging.warning('%s', stopped)
    sys.exit(stopped.exit_status)  # 128 + the signal: stopped, to be resumed.


def run() -> None:
  """The `secvit-train` command."""
  host_memory.reexec_with_memory_settings()  # First: the C library reads them only at start-up.
  cli.run(main)


if __name__ == '__main__':
  run()
