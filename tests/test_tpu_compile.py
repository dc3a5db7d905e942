"""The real train step compiles for a TPU slice on a machine without a TPU (libtpu's compiler)."""

import os
import json
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compile_reduced_secvit(tmp_path, batch_size):
  """A reduced SecViT (32×32 images) on v5e:2x4 with parameters sharded over 4 chips."""
  output = tmp_path / 'tpu.json'
  command = [
      sys.executable, '-m', 'benchmarks.tpu_compile', '--config=configs/demo.py',
      '--topology=v5e:2x4', '--num_classes=10', '--num_train_examples=1437',
      f'--config.batch_size={batch_size}', '--config.mesh.data=2', '--config.mesh.fsdp=4',
      '--config.model.embed_dims=(16,32,32,32)', '--config.model.num_heads=(1,2,2,2)',
      '--config.model.depths=(1,1,1,1)', '--config.model.projection=32', f'--json={output}']
  env = dict(os.environ)
  env.pop('JAX_PLATFORMS', None)  # The script sets what it needs itself.
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
  report = json.loads(output.read_text()) if output.exists() else None
  return result, report


def test_a_batch_beyond_hbm_is_reported_as_not_fitting(tmp_path):
  result, report = _compile_reduced_secvit(tmp_path, 2**21)
  assert result.returncode == 1, result.stderr[-3000:]
  assert report['fits'] is False and report['flops_per_step'] is None
  assert report['per_chip_bytes'] > report['hbm_bytes_per_chip'] > 15 * 2**30
  assert 'out of HBM' in result.stdout


def test_train_step_compiles_for_v5e_with_fsdp(tmp_path):
  result, report = _compile_reduced_secvit(tmp_path, 16)
  assert result.returncode == 0, result.stderr[-3000:]
  assert report['topology'] == 'v5e:2x4' and report['chips'] == 8
  assert report['mesh'] == {'data': 2, 'fsdp': 4}
  assert report['global_batch'] == 16
  assert report['hbm_bytes_per_chip'] == 16 * 2**30
  assert 0 < report['per_chip_bytes'] < report['hbm_bytes_per_chip']
  assert report['flops_per_step'] > 0
  # Data parallel gradients are reduced; FSDP gathers the sharded parameters.
  assert report['collectives'].get('all-reduce', 0) + report['collectives'].get(
      'reduce-scatter', 0) > 0
  assert report['collectives'].get('all-gather', 0) > 0
  assert 'memory per chip' in result.stdout
