r"""Compiles the real training step for a TPU topology on a machine without a TPU.

    python -m benchmarks.tpu_compile --config=configs/secvit_s.py --topology=v5e:2x4 \
        [--config.mesh.fsdp=8 --config.mesh.data=1] [--json OUT]

With `libtpu` installed (requirements-dev.txt), JAX describes a TPU slice without one
(`jax.experimental.topologies`); the train step of `secvit_jax.train_lib`, with the config's mesh
and sharding rules laid over that slice's chips, is lowered and compiled by the TPU compiler.
Reported from the compiled program: memory per chip (arguments + outputs - donated aliases +
temporaries) against the chip's HBM, FLOPs per step (XLA's count for one chip's program × chips),
and the collectives in the program (op name -> count). When the program does not fit, the TPU
compiler stops with the memory it needed (at least) and the HBM it had; those are reported
(`fits` false, no FLOPs or collectives) and the exit status is 1.
"""

from __future__ import annotations

import json
import os
import re
import time

# The TPU runtime reads these to describe the host; this machine has no TPU to ask.
os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5litepod-8')
os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# libtpu otherwise holds a lock file that lets one process at a time use it.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
# JAX's default backend here is the CPU: keep its native kernels out of the TPU program.
os.environ['SECVIT_JAX_CPU_KERNELS'] = '0'

# pylint: disable=g-import-not-at-top,wrong-import-position,g-bad-import-order
from secvit_jax import quiet

quiet.silence_startup_noise()  # Before TensorFlow loads (through train_lib).

from absl import flags
import jax
from jax.experimental import topologies

from benchmarks import common
from secvit_jax import cli
from secvit_jax import sharding
from secvit_jax import tasks
from secvit_jax import train_lib
from secvit_jax.data import sources

_CONFIG = cli.define_config_flag('config', 'Training config file, e.g. configs/secvit_s.py.')
_TOPOLOGY = flags.DEFINE_string('topology', 'v5e:2x4',
                                "TPU topology, '<generation>:<chips per axis>', e.g. v5e:2x4, "
                                'v4:2x2x2, v5e:4x4.')
_JSON = flags.DEFINE_string('json', None, 'Also write the results as JSON here.')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', 1000, 'Classes of the head.')
_TRAIN_EXAMPLES = flags.DEFINE_integer('num_train_examples', 1_281_167,
                                       'Examples per epoch (for the schedule).')
flags.mark_flags_as_required(['config'])

# HBM per chip in bytes, by the device kind JAX reports.
HBM_BYTES = {
    'TPU v4': 32 * 2**30,
    'TPU v5 lite': 16 * 2**30,
    'TPU v5e': 16 * 2**30,
    'TPU v5': 95 * 2**30,
    'TPU v5p': 95 * 2**30,
    'TPU v6 lite': 32 * 2**30,
    'TPU v6e': 32 * 2**30,
}
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')


def count_collectives(hlo_text: str) -> dict[str, int]:
  """Collective ops in an HLO module's text, by op name (async '-start' halves counted once)."""
  counts = {}
  for name in COLLECTIVES:
    found = len(re.findall(rf'= [^=\n]*\b{name}(?:-start)?\(', hlo_text))
    if found:
      counts[name] = found
  return counts


def compile_for_topology(config, topology_name: str, num_classes: int, num_train_examples: int):
  """Lowers and compiles the train step for `topology_name`; returns the result dict."""
  topology = topologies.get_topology_desc(platform='tpu', topology_name=topology_name)
  devices = topology.devices
  # The model picks its depthwise-conv formulation from JAX's default backend, which is this
  # machine's CPU: say what a TPU host would pick.
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.dwconv_impl = 'xla'
  mesh = sharding.create_mesh(config.mesh, devices)
  info = sources.DatasetInfo(num_classes=num_classes, num_train_examples=num_train_examples,
                             num_eval_examples=0)
  task = tasks.get_task_class(config.task)(config, info)
  setup = train_lib.create_train_setup(config, mesh, task)
  start = time.perf_counter()
  result = {
      'topology': topology_name,
      'device_kind': devices[0].device_kind,
      'chips': len(devices),
      'mesh': dict(mesh.shape),
      'model': config.model.name,
      'task': config.task,
      # The dense head: segmentation's config.head.name, detection's config.detector.
      'head': (config.head.name if 'head' in config
               else config.detector if 'detector' in config else None),
      'input': list(setup.abstract_batch['image'].shape[1:3]),
      'dtype': config.dtype,
      'remat': bool(config.model.remat),
      'global_batch': int(config.batch_size),
  }
  return {**result, **compile_and_measure(
      setup.train_step.lower(setup.abstract_state, setup.abstract_batch), devices)}


def compile_and_measure(lowered, devices) -> dict:
  """Compiles a program lowered for `devices` (one TPU slice); its memory per chip and cost.

  Returns per_chip_bytes (arguments + outputs - donated aliases + temporaries), per_chip_breakdown,
  hbm_bytes_per_chip, fits, flops_per_step (XLA's count for one chip × chips), collectives and
  compile_s. When the TPU compiler refuses the program for lack of HBM: the memory it said it
  needed (at least), fits False, and no FLOPs, breakdown or collectives.
  """
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as error:
    # The TPU compiler refuses a program that overflows HBM and says by how much, in one of two
    # phrasings; the second counts temporaries only, a lower bound of the total.
    used = (re.search(r'Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm', str(error)) or
            re.search(r'temporaries \(([\d.]+)([KMGT])\) exceeds available HBM '
                      r'\(([\d.]+)([KMGT])\)', str(error)))
    if used is None:
      raise
    scale = {'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}
    return {'per_chip_bytes': int(float(used[1]) * scale[used[2]]),
            'hbm_bytes_per_chip': int(float(used[3]) * scale[used[4]]), 'fits': False,
            'flops_per_step': None, 'collectives': None,
            'compile_s': time.perf_counter() - start}
  compile_s = time.perf_counter() - start
  flops, memory = common.compiled_analyses(compiled)
  per_chip = (memory['argument_bytes'] + memory['output_bytes'] - memory['alias_bytes']
              + memory['temp_bytes'])
  hbm = HBM_BYTES.get(devices[0].device_kind)
  return {
      'per_chip_bytes': per_chip,
      'per_chip_breakdown': memory,
      'hbm_bytes_per_chip': hbm,
      'fits': None if hbm is None else per_chip <= hbm,
      'flops_per_step': flops * len(devices),
      'collectives': count_collectives(compiled.as_text()),
      'compile_s': compile_s,
  }


def main(argv):
  del argv
  result = compile_for_topology(_CONFIG.value, _TOPOLOGY.value, _NUM_CLASSES.value,
                                _TRAIN_EXAMPLES.value)
  gib = 2**30
  hbm = result['hbm_bytes_per_chip']
  print(f"{result['model']} on {result['topology']} ({result['chips']} × {result['device_kind']}, "
        f"mesh {result['mesh']}), global batch {result['global_batch']}, {result['dtype']}:")
  print(f"  memory per chip {result['per_chip_bytes'] / gib:.2f} GiB of "
        f"{hbm / gib if hbm else float('nan'):.0f} GiB HBM: "
        f"{'fits' if result['fits'] else 'DOES NOT FIT' if result['fits'] is False else '?'}")
  if result['flops_per_step'] is None:
    print(f"  the TPU compiler stopped: out of HBM (after {result['compile_s']:.0f} s)")
  else:
    print(f"  {result['flops_per_step'] / 1e12:.1f} TFLOP per step; collectives "
          f"{result['collectives']}; compiled in {result['compile_s']:.0f} s")
  if _JSON.value:
    os.makedirs(os.path.dirname(os.path.abspath(_JSON.value)), exist_ok=True)
    with open(_JSON.value, 'w') as f:
      json.dump(result, f, indent=2)
  return 0 if result['fits'] is not False else 1


if __name__ == '__main__':
  cli.run(main)
