"""The CLIs' restart with glibc's transparent-huge-page tunable."""

import os
import subprocess
import sys

import pytest

from secvit_jax import hugepages

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = """
import os, sys
from secvit_jax import hugepages
print('before', os.getpid(), flush=True)
hugepages.reexec_with_huge_pages()
print('after', os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], flush=True)
"""

pytestmark = pytest.mark.skipif(not hugepages.supported(), reason='needs Linux with glibc >= 2.35')


def _run(tmp_path, **env):
  script = tmp_path / 'script.py'
  script.write_text(SCRIPT)
  environment = {k: v for k, v in os.environ.items()
                 if k not in ('GLIBC_TUNABLES', hugepages.OPT_OUT)}
  environment.update(env, PYTHONPATH=REPO_ROOT)
  result = subprocess.run([sys.executable, str(script), '--flag', 'value'], env=environment,
                          capture_output=True, text=True, check=True, timeout=120)
  return result.stdout.splitlines()


def test_restarts_once_in_place_with_the_tunable_and_the_same_arguments(tmp_path):
  lines = _run(tmp_path, GLIBC_TUNABLES='glibc.malloc.tcache_count=7')
  before = [line for line in lines if line.startswith('before')]
  after = [line for line in lines if line.startswith('after')]
  assert len(before) == 2 and len(after) == 1, lines  # Started twice, went past once.
  assert before[0].split()[1] == before[1].split()[1] == after[0].split()[1]  # Same PID.
  assert "glibc.malloc.tcache_count=7:glibc.malloc.hugetlb=1 ['--flag', 'value']" in after[0]


def test_opting_out_keeps_the_process(tmp_path):
  lines = _run(tmp_path, **{hugepages.OPT_OUT: '1'})
  assert len(lines) == 2 and lines[1].endswith('None [\'--flag\', \'value\']'), lines
