"""Builds the project's native sources with the system's compiler, once, into a cache.

Both native libraries are compiled on the machine that runs them, never shipped:
`cpu_kernels.cc` (XLA FFI kernels, loaded by `cpu_kernels`) and `buffer_cache.c` (preloaded by
`host_memory`). A library is cached under `$SECVIT_JAX_CACHE` (default `~/.cache/secvit_jax`) by a
hash of its source, the compiler, the flags and whatever else the caller names; JAX is not imported
here, so `host_memory` can build before the process restarts.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
from typing import Sequence


def cache_dir() -> pathlib.Path:
  default = pathlib.Path.home() / '.cache' / 'secvit_jax'
  return pathlib.Path(os.environ.get('SECVIT_JAX_CACHE', default))


def build(source: pathlib.Path, *, compiler_env: str, default_compiler: str,
          flags: Sequence[str], key_extra: str = '') -> pathlib.Path:
  """Compiles `source` into a shared library (`flags` and the output path are the whole command
  after the compiler) unless the cache has it; returns its path.

  Args:
    source: the C or C++ file.
    compiler_env: the environment variable naming the compiler ('CXX', 'CC').
    default_compiler: the compiler when that variable is unset.
    flags: the compiler's flags before the source.
    key_extra: what else the library depends on (e.g. jaxlib's version).

  Raises:
    RuntimeError: no such compiler, or it failed (with the end of its messages).
  """
  requested = os.environ.get(compiler_env, default_compiler)
  compiler = shutil.which(requested)
  if compiler is None:
    raise RuntimeError(f'no compiler {requested!r} found (set ${compiler_env} to one)')
  key = hashlib.sha256(source.read_bytes() + key_extra.encode() +
                       ' '.join((compiler, *flags)).encode()).hexdigest()[:16]
  library = cache_dir() / f'{source.stem}-{key}.so'
  if library.exists():
    return library
  library.parent.mkdir(parents=True, exist_ok=True)
  from secvit_jax import files  # pylint: disable=g-import-not-at-top  (etils: only when building)
  # Built beside the target and renamed: processes building at once never load a partial file.
  with files.staged(library) as staged:
    command = [compiler, *flags, str(source), '-o', str(staged)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
      raise RuntimeError(f'{" ".join(command)} failed:\n{result.stderr[-4000:]}')
  return library
