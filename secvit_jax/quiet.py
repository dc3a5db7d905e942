"""Keeps two kinds of start-up noise out of the command-line tools' output.

- A TPU that is not there. JAX tries every backend it knows, the TPU too: with libtpu installed
  (requirements-test.txt, for the compile without a TPU) the TPU runtime prints `Failed to find
  host bounds for accelerator type` and `INVALID_ARGUMENT: ... unexpected worker hostname`, takes
  /tmp/libtpu_lockfile, and JAX logs `Unable to initialize backend 'tpu'` (without libtpu, that
  last line remains). Where JAX would find nothing but the CPU, it is told so (`jax_platforms`).
- TensorFlow's banners. TensorFlow 2.21 logs `oneDNN custom operations are on` at INFO level, and
  absl's `All log messages before absl::InitializeLog() is called are written to STDERR`, once
  for each of its two shared libraries, through a C++ logger that TF_CPP_MIN_LOG_LEVEL does not
  govern (levels 1 to 3 leave them all). Its import runs with those lines filtered out of stderr.

`silence_startup_noise()` does both; the CLIs call it before they import TensorFlow. Everything
else on stderr passes, and a user's own JAX_PLATFORMS or JAX_FORCE_TPU_INIT wins.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.metadata
import importlib.util
import os
import re
import sys
import tempfile
from typing import Iterator

# What TensorFlow's import prints and `_without_banners` drops: INFO records of absl's C++ logger
# ('I0000 00:00:1796013943.464359   12626 port.cc:153] oneDNN custom operations are on. ...'),
# the second line of one of them (cpu_feature_guard.cc's), and absl's note about its logging.
_INFO_RECORD = re.compile(r'I\d{4} [\d:.]+ +\d+ \S+:\d+\] ')
_CONTINUATION = re.compile(r'To enable the following instructions: .* rebuild TensorFlow ')
_ABSL_NOTE = ('WARNING: All log messages before absl::InitializeLog() is called are written to '
              'STDERR')


def silence_startup_noise() -> None:
  """Hides an absent TPU's probe from JAX and TensorFlow's import-time banners.

  Call it first in a command-line entry point (after `host_memory.reexec_with_memory_settings`): it
  must run before JAX initializes a backend and before TensorFlow is imported.
  """
  _skip_the_tpu_probe_where_only_a_cpu_is_found()
  if 'tensorflow' not in sys.modules and not any(
      isinstance(finder, _QuietTensorFlowImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _QuietTensorFlowImport())


def _skip_the_tpu_probe_where_only_a_cpu_is_found() -> None:
  """Sets `jax_platforms` to 'cpu' where JAX, left to itself, would find nothing else: no TPU chip
  attached, no GPU device, no PJRT plugin package (CUDA, ROCm, ...) installed. On a TPU VM, a GPU
  machine or with a plugin JAX keeps choosing for itself."""
  if 'JAX_PLATFORMS' in os.environ or 'JAX_FORCE_TPU_INIT' in os.environ:
    return
  import jax  # pylint: disable=g-import-not-at-top
  try:
    # JAX's own look at the hardware: the PCI scan its TPU set-up (cloud_tpu_init) relies on, and
    # the device files by which it tells whether a GPU is present.
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    accelerator = (hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0 or
                   hardware_utils.has_visible_nvidia_gpu() or
                   hardware_utils.num_available_amd_gpus(stop_at=1) > 0)
  except (ImportError, AttributeError, OSError):
    return  # Another JAX: it chooses.
  plugins = (importlib.metadata.entry_points(group='jax_plugins') or
             importlib.util.find_spec('jax_plugins') is not None)
  if not accelerator and not plugins:
    jax.config.update('jax_platforms', 'cpu')


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
  """Finds `tensorflow` as the other finders do, and has its package run with TensorFlow's
  banners filtered out of stderr. It stays on `sys.meta_path`: a look without an import (etils'
  `epath` asks `importlib.util.find_spec('tensorflow')` whether TensorFlow is installed) must not
  use it up, and once TensorFlow is imported no finder is asked again."""

  def __init__(self):
    self._finding = False

  def find_spec(self, fullname, path=None, target=None):
    del path, target
    if fullname != 'tensorflow' or self._finding:
      return None
    self._finding = True  # The other finders' spec, without asking this one again.
    try:
      spec = importlib.util.find_spec(fullname)
    finally:
      self._finding = False
    if spec is not None and spec.loader is not None:
      spec.loader = _FilteredLoader(spec.loader)
    return spec


class _FilteredLoader(importlib.abc.Loader):
  """`loader`, with the module's code run under `_stderr_without_banners`."""

  def __init__(self, loader: importlib.abc.Loader):
    self._loader = loader

  def __getattr__(self, name):  # Resources, source, is_package...: the wrapped loader's.
    return getattr(self._loader, name)

  def create_module(self, spec):
    return self._loader.create_module(spec)

  def exec_module(self, module):
    with _stderr_without_banners():
      self._loader.exec_module(module)


@contextlib.contextmanager
def _stderr_without_banners() -> Iterator[None]:
  """Collects what is written to file descriptor 2 (C++ and Python alike) while the block runs,
  then writes it back to stderr without TensorFlow's banners."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as collected:
    os.dup2(collected.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      collected.seek(0)
      sys.stderr.write(_without_banners(collected.read().decode(errors='replace')))
      sys.stderr.flush()


def _without_banners(text: str) -> str:
  return ''.join(line for line in text.splitlines(keepends=True)
                 if not (_INFO_RECORD.match(line) or _CONTINUATION.match(line) or
                         line.rstrip('\n') == _ABSL_NOTE))
