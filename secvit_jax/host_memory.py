"""Host memory for XLA's CPU runtime: transparent huge pages and a cache of its large buffers.

XLA's CPU runtime allocates a compiled program's buffers afresh on every execution, the temporary
ones as one block (999.5 MB for a secvit_t train step at batch 8, 224²), and frees them when it
ends. glibc serves such blocks with mmap and unmaps them on free, so the kernel maps and zeroes
them again on every step. Two settings, which the C library reads only when a process starts:

- glibc's tunable `glibc.malloc.hugetlb=1` (glibc ≥ 2.35) backs those mappings with 2 MiB
  transparent huge pages: a secvit_s train step took 570,000 page faults and 1.1 s of kernel time
  with 4 KiB pages, 2,000 and 0.3 s with huge pages;
- `buffer_cache.c`, preloaded (LD_PRELOAD), keeps freed blocks of 64 MiB and more mapped for the
  next request of about their size, so no page is mapped or zeroed again: the secvit_t train step
  964 -> 864 ms (medians of 12, alternating processes, 2-core Xeon), with no page faults left in
  it. It is built with the system's C compiler (`$CC`, default `cc`) on first use and cached
  (`native_build`); without a compiler the process goes on without it, after a one-line notice.

`reexec_with_memory_settings` restarts the process with both, once, before any work (same PID,
same arguments); the CLIs (`train.py`, the benchmarks) call it first. The cache only where JAX
computes on the CPU (`computes_on_the_cpu`): on TPU and GPU hosts it was never measured, and
there the tunable alone is set, as before. `SECVIT_JAX_DEFAULT_MALLOC=1`
keeps the process as it was started. From your own program, start it with both yourself:

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 LD_PRELOAD=$(python -m secvit_jax.host_memory) python ...
"""

from __future__ import annotations

import os
import pathlib
import platform
import sys
from typing import MutableMapping

TUNABLE = 'glibc.malloc.hugetlb=1'
# Set to any value to keep the process as it was started.
OPT_OUT = 'SECVIT_JAX_DEFAULT_MALLOC'
# Set in the restarted process (and inherited by its children, which start with its settings).
RESTARTED = 'SECVIT_JAX_MEMORY_SETTINGS'
_SOURCE = pathlib.Path(__file__).with_name('buffer_cache.c')
_FLAGS = ('-O2', '-std=c11', '-shared', '-fPIC')
# Accelerators by their device files: PCI devices of Google's vendor id (TPUs, as JAX's TPU
# set-up finds them), NVIDIA's device nodes and AMD's compute driver. Read here without JAX, whose
# import (a second) would otherwise come before the restart.
_GOOGLE_PCI_VENDOR = '0x1ae0'
_GPU_DEVICE_FILES = ('dev/nvidia[0-9]*', 'dev/kfd')


def supported() -> bool:
  """Whether this C library knows the tunable and lets malloc be replaced: Linux, glibc ≥ 2.35."""
  library, version = platform.libc_ver()
  try:
    return (sys.platform == 'linux' and library == 'glibc' and
            tuple(map(int, version.split('.')[:2])) >= (2, 35))
  except ValueError:
    return False


def computes_on_the_cpu(device_root: str = '/') -> bool:
  """Whether JAX will run on the CPU: $JAX_PLATFORMS names 'cpu' first or, if unset, this machine
  has no TPU or GPU (`device_root` stands in for '/' in tests)."""
  platforms = os.environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  root = pathlib.Path(device_root)
  for vendor in root.glob('sys/bus/pci/devices/*/vendor'):
    try:
      if vendor.read_text().strip() == _GOOGLE_PCI_VENDOR:
        return False
    except OSError:
      continue
  return not any(any(root.glob(pattern)) for pattern in _GPU_DEVICE_FILES)


def preloaded_paths(ld_preload: str) -> list[str]:
  """The libraries an $LD_PRELOAD value names (separated by spaces or colons, as the loader reads
  it)."""
  return ld_preload.replace(':', ' ').split()


def is_buffer_cache(path: str) -> bool:
  """Whether `path` is a build of the buffer cache (`native_build` names it after its source)."""
  return os.path.basename(path).startswith(f'{_SOURCE.stem}-')


def buffer_cache_library() -> pathlib.Path:
  """The buffer cache's shared library, built if need be (RuntimeError if it cannot be)."""
  from secvit_jax import native_build  # pylint: disable=g-import-not-at-top
  return native_build.build(_SOURCE, compiler_env='CC', default_compiler='cc', flags=_FLAGS)


def needs_reexec() -> bool:
  """True where `supported()`, the user did not opt out and this process was not restarted yet."""
  return OPT_OUT not in os.environ and RESTARTED not in os.environ and supported()


def _preload_the_buffer_cache(environment: MutableMapping[str, str]) -> None:
  """Adds the buffer cache to $LD_PRELOAD, or says on stderr in one line why it cannot."""
  try:
    library = str(buffer_cache_library())
  except (OSError, RuntimeError) as error:
    first_line = str(error).splitlines()[0]
    print(f'secvit_jax: XLA\'s CPU buffers are mapped afresh every step (slower): the buffer '
          f'cache did not build: {first_line}', file=sys.stderr)
    return
  preloaded = environment.get('LD_PRELOAD', '')
  if library not in preloaded_paths(preloaded):
    environment['LD_PRELOAD'] = ' '.join(filter(None, [library, preloaded]))


def reexec_with_memory_settings() -> None:
  """Replaces this process by the same command line (`python -m` included) with the tunable set
  and, where `computes_on_the_cpu()`, the buffer cache preloaded; returns at once if
  `needs_reexec()` is False or both are set already."""
  if not needs_reexec():
    return
  environment = os.environ
  started_with = dict(environment)
  if 'glibc.malloc.hugetlb' not in environment.get('GLIBC_TUNABLES', ''):
    environment['GLIBC_TUNABLES'] = ':'.join(
        filter(None, [environment.get('GLIBC_TUNABLES'), TUNABLE]))
  if computes_on_the_cpu():
    _preload_the_buffer_cache(environment)
  environment[RESTARTED] = '1'
  if environment == {**started_with, RESTARTED: '1'}:
    return  # Started with both already.
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, sys.orig_argv)


if __name__ == '__main__':
  print(buffer_cache_library())
