"""The CLIs' restart with glibc's huge-page tunable and the buffer cache (`buffer_cache.c`)."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from secvit_jax import host_memory

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESTART_SCRIPT = """
import os, sys
from secvit_jax import host_memory
print('before', os.getpid(), flush=True)
host_memory.reexec_with_memory_settings()
print('after', os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], flush=True)
print('preload', os.environ.get('LD_PRELOAD'), flush=True)
"""

pytestmark = pytest.mark.skipif(not host_memory.supported(),
                                reason='needs Linux with glibc >= 2.35')
needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get('CC', 'cc')) is None,
                                    reason='needs a C compiler')


def _clean_environment(tmp_path, **env):
  environment = {k: v for k, v in os.environ.items()
                 if k not in ('GLIBC_TUNABLES', 'LD_PRELOAD', host_memory.OPT_OUT,
                              host_memory.RESTARTED)}
  environment.update(env, PYTHONPATH=REPO_ROOT, SECVIT_JAX_CACHE=str(tmp_path / 'cache'))
  return environment


def _run(tmp_path, script, *args, **env):
  path = tmp_path / 'script.py'
  path.write_text(script)
  return subprocess.run([sys.executable, str(path), *args], env=_clean_environment(tmp_path, **env),
                        capture_output=True, text=True, check=True, timeout=300)


@needs_compiler
def test_restarts_once_in_place_with_the_tunable_the_cache_and_the_same_arguments(tmp_path):
  result = _run(tmp_path, RESTART_SCRIPT, '--flag', 'value',
                GLIBC_TUNABLES='glibc.malloc.tcache_count=7')
  lines = result.stdout.splitlines()
  before = [line for line in lines if line.startswith('before')]
  after = [line for line in lines if line.startswith('after')]
  assert len(before) == 2 and len(after) == 1, lines  # Started twice, went past once.
  assert before[0].split()[1] == before[1].split()[1] == after[0].split()[1]  # Same PID.
  assert "glibc.malloc.tcache_count=7:glibc.malloc.hugetlb=1 ['--flag', 'value']" in after[0]
  preload = lines[-1].split()[1]
  assert os.path.basename(preload).startswith('buffer_cache-') and os.path.isfile(preload), lines
  assert result.stderr == ''


def test_without_a_compiler_it_restarts_with_the_tunable_alone_and_says_so(tmp_path):
  result = _run(tmp_path, RESTART_SCRIPT, CC=str(tmp_path / 'no-such-compiler'))
  lines = result.stdout.splitlines()
  assert len([line for line in lines if line.startswith('before')]) == 2, lines
  assert lines[-2].endswith('glibc.malloc.hugetlb=1 []') and lines[-1] == 'preload None', lines
  notice = result.stderr.strip().splitlines()
  assert len(notice) == 1 and 'buffer cache did not build' in notice[0], result.stderr
  assert 'no-such-compiler' in notice[0]


def test_opting_out_keeps_the_process(tmp_path):
  lines = _run(tmp_path, RESTART_SCRIPT, '--flag', 'value',
               **{host_memory.OPT_OUT: '1'}).stdout.splitlines()
  assert len(lines) == 3 and lines[1].endswith('None [\'--flag\', \'value\']'), lines


def test_where_jax_would_compute_on_a_tpu_or_gpu_it_restarts_with_the_tunable_alone(tmp_path):
  result = _run(tmp_path, RESTART_SCRIPT, JAX_PLATFORMS='tpu', CC=str(tmp_path / 'no-such-cc'))
  lines = result.stdout.splitlines()
  assert lines[-2].endswith('glibc.malloc.hugetlb=1 []') and lines[-1] == 'preload None', lines
  assert result.stderr == ''  # Not built, so no notice either.


def test_computes_on_the_cpu_reads_jax_platforms_first_then_the_device_files(tmp_path,
                                                                            monkeypatch):
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  root = tmp_path / 'root'
  (root / 'dev').mkdir(parents=True)
  device = root / 'sys/bus/pci/devices/0000:00:04.0'
  device.mkdir(parents=True)
  (device / 'vendor').write_text('0x8086\n')  # Intel: not an accelerator.
  assert host_memory.computes_on_the_cpu(str(root))
  (device / 'vendor').write_text('0x1ae0\n')  # Google: a TPU.
  assert not host_memory.computes_on_the_cpu(str(root))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert host_memory.computes_on_the_cpu(str(root))
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda,cpu')
  assert not host_memory.computes_on_the_cpu(str(root))
  monkeypatch.delenv('JAX_PLATFORMS')
  (device / 'vendor').unlink()
  for gpu in ('nvidia0', 'kfd'):
    (root / 'dev' / gpu).touch()
    assert not host_memory.computes_on_the_cpu(str(root)), gpu
    (root / 'dev' / gpu).unlink()
  assert host_memory.computes_on_the_cpu(str(root))


# Run with the cache preloaded (and its idle limit at 150 MiB): malloc, free and friends through
# ctypes, as XLA's runtime calls them.
CACHE_SCRIPT = """
import ctypes, errno
import numpy as np
libc = ctypes.CDLL(None)
for name in ('malloc', 'calloc', 'realloc', 'memalign'):
  getattr(libc, name).restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
libc.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.malloc_usable_size.argtypes = [ctypes.c_void_p]
libc.malloc_usable_size.restype = ctypes.c_size_t
libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t]
MiB, HUGE = 1 << 20, 2 << 20

def view(pointer, size):
  return np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(pointer))

def mapped(pointer):
  ranges = [[int(bound, 16) for bound in line.split()[0].split('-')]
            for line in open('/proc/self/maps')]
  return any(start <= pointer < end for start, end in ranges)

a = libc.malloc(100 * MiB)
assert a % HUGE == 0 and libc.malloc_usable_size(a) >= 100 * MiB, hex(a)
view(a, 100 * MiB)[:] = 0xAB
libc.free(a)
assert mapped(a)  # Idle, kept.
b = libc.malloc(96 * MiB)  # Within 1/8 of the idle block: it comes back.
assert b == a, (hex(a), hex(b))
libc.free(b)
c = libc.calloc(25, 4 * MiB)  # The same block again, zeroed.
assert c == a and not view(c, 100 * MiB).any()
view(c, 16)[:] = np.arange(16)
d = libc.realloc(c, 130 * MiB)  # Moves to a new block with the contents.
assert d != c and d % HUGE == 0 and list(view(d, 16)) == list(range(16))
e = libc.realloc(d, 64)  # Small again: glibc's, contents kept.
assert e % HUGE != 0 and list(view(e, 16)) == list(range(16))
# Idle now: 100 MiB (a's block, freed by the realloc to d), then 130 MiB (d): over the 150 MiB
# limit, the least recently freed (a's) was unmapped.
assert not mapped(a) and mapped(d)
libc.free(e)
small = libc.malloc(50 * MiB)  # Below the threshold: glibc's.
assert small % HUGE != 0
libc.free(small)
out = ctypes.c_void_p()
assert libc.posix_memalign(ctypes.byref(out), 4096, 70 * MiB) == 0 and out.value % HUGE == 0
assert libc.posix_memalign(ctypes.byref(out), 3, 70 * MiB) == errno.EINVAL
print('ok')
"""


@needs_compiler
def test_the_cache_keeps_and_reuses_large_blocks_and_serves_the_rest_from_glibc(tmp_path):
  library = host_memory.buffer_cache_library()
  result = _run(tmp_path, CACHE_SCRIPT, LD_PRELOAD=str(library), SECVIT_JAX_BUFFER_CACHE_MB='150')
  assert result.stdout.strip() == 'ok', result.stderr


# An XLA program whose temporary buffer (the product, 128 MiB) is over the threshold: without the
# cache each call maps it afresh (with 4 KiB pages: 32,768 faults), with it never again.
XLA_SCRIPT = """
import resource
import jax, jax.numpy as jnp
f = jax.jit(lambda a, b: jnp.tanh(a @ b)[::7, ::7].sum())
a = jnp.linspace(-1.0, 1.0, 4096 * 64).reshape(4096, 64)
b = jnp.linspace(-1.0, 1.0, 64 * 8192).reshape(64, 8192)
results = [float(f(a, b)) for _ in range(3)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
results += [float(f(a, b)) for _ in range(4)]
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4
print(results[0], len(set(results)), faults)
"""


@needs_compiler
def test_an_xla_program_stops_faulting_its_temporary_buffer_in_and_computes_the_same(tmp_path):
  library = host_memory.buffer_cache_library()
  plain = _run(tmp_path, XLA_SCRIPT, JAX_PLATFORMS='cpu').stdout.split()
  cached = _run(tmp_path, XLA_SCRIPT, JAX_PLATFORMS='cpu', LD_PRELOAD=str(library)).stdout.split()
  assert plain[:2] == cached[:2] and cached[1] == '1'
  assert float(plain[2]) > 10_000 and float(cached[2]) < 1_000, (plain, cached)
