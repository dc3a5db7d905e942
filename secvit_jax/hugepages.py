"""Transparent huge pages for the buffers of XLA's CPU runtime.

XLA's CPU runtime allocates the buffers of a compiled program afresh on every execution; glibc
serves large allocations with mmap, and the kernel maps them 4 KiB at a time on first touch. A
secvit_s train step (batch 8, 224², 2 cores) took 570,000 page faults and 1.1 s of kernel time
that way. glibc's tunable `glibc.malloc.hugetlb=1` (glibc ≥ 2.35) makes malloc advise the kernel
to back those mappings with 2 MiB transparent huge pages: 2,000 faults and 0.3 s of kernel time.
glibc reads tunables only when a process starts, so `reexec_with_huge_pages` restarts the
process with it, once, before any work; the CLIs (`train.py`, the benchmarks) call it first.
Library users can export `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` themselves.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = 'glibc.malloc.hugetlb=1'
# Set to any value to keep the process as it was started.
OPT_OUT = 'SECVIT_JAX_NO_HUGEPAGES'


def supported() -> bool:
  """Whether this C library knows the tunable: Linux with glibc ≥ 2.35."""
  library, version = platform.libc_ver()
  try:
    return (sys.platform == 'linux' and library == 'glibc' and
            tuple(map(int, version.split('.')[:2])) >= (2, 35))
  except ValueError:
    return False


def needs_reexec() -> bool:
  """True where `supported()`, the tunable is not set yet and the user did not opt out."""
  return (OPT_OUT not in os.environ and
          'glibc.malloc.hugetlb' not in os.environ.get('GLIBC_TUNABLES', '') and supported())


def reexec_with_huge_pages() -> None:
  """Replaces this process by the same command line with the tunable set (same PID, same
  arguments, `python -m` included); returns at once if that is not needed."""
  if not needs_reexec():
    return
  os.environ['GLIBC_TUNABLES'] = ':'.join(
      filter(None, [os.environ.get('GLIBC_TUNABLES'), TUNABLE]))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, sys.orig_argv)
