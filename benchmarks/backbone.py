r"""The backbone at dense-prediction sizes: fixed cluster counts against tokens_per_cluster.

    python -m benchmarks.backbone [--variant secvit_s] [--batch 1] [--runs 3] \
        [--topology v5e:2x4 --tpu_batch 16] [--skip cpu tpu padding] [--json OUT]

For 512×512 (ADE20K crops) and 800×1344 (COCO, padded to a multiple of 32), each with the
release's fixed cluster counts (32, 8, 2, global) and with `tokens_per_cluster=(98, 98, 98, 0)`
(the release's 98 tokens per cluster at 224×224, kept at any size), it measures:
- cpu: forward and forward+backward time of `create_backbone(variant)` (four outputs, output
  norms; the backward of a loss on the outputs with train=True, so BatchNorm uses batch statistics
  and stochastic depth is on), the minimum over --runs calls after a warm-up call, float32, on
  this machine's CPU, and the compiled program's temporary memory (XLA's memory analysis); the
  two clusterings of one size are timed in alternation (see `time_alternately`), and a program
  needing more than --cpu_memory_limit GiB of temporaries is compiled but not run;
- tpu: the memory per chip of the same forward+backward compiled by the TPU compiler for
  --topology without a TPU (as `benchmarks/tpu_compile.py`): bfloat16 compute, global batch
  --tpu_batch split over the chips (data parallel, parameters replicated), and again with remat
  where that does not fit. No optimizer state: for secvit_s AdamW would add about 0.2 GiB per
  chip.
- padding: the cost of padding, forward and forward+backward at 232×200 (stages of 2,900, 725
  and 195 tokens in 32, 8 and 2 clusters: 12, 3 and 1 pad slots) against 224×224 (no padding),
  per stage-0 token, fixed counts, --padding_batch images, timed in alternation.
"""

from __future__ import annotations

import argparse
import json
import os
import time

# libtpu reads these to describe a TPU slice this machine does not have (for --skip cpu padding);
# JAX's own backend stays the CPU.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5litepod-8')
os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from benchmarks import common  # pylint: disable=wrong-import-position
from secvit_jax import cpu_kernels  # pylint: disable=wrong-import-position
from secvit_jax import host_memory  # pylint: disable=wrong-import-position
from secvit_jax import model as model_lib  # pylint: disable=wrong-import-position

PADDING_SIZES = ((224, 224), (232, 200))
# (label, overrides): the two ways to choose the cluster counts.
CLUSTERINGS = (('fixed counts', {}),
               ('98 tokens per cluster', {'tokens_per_cluster': (98, 98, 98, 0)}))


def size(text: str) -> tuple[int, int]:
  """'800x1344' -> (800, 1344)."""
  try:
    height, width = (int(side) for side in text.lower().split('x'))
  except ValueError:
    raise argparse.ArgumentTypeError(f'a size is HEIGHTxWIDTH, e.g. 800x1344; got {text!r}')
  return height, width


def forward_and_backward(backbone: model_lib.SecViTBackbone):
  """(forward, forward+backward) of the backbone as functions of (variables, images).

  The backward pass is the gradient of the mean square of every output with respect to the
  parameters, in training mode (batch statistics, stochastic depth with a fixed key).
  """
  def forward(variables, images):
    return backbone.apply(variables, images, train=False)

  def loss(params, batch_stats, images):
    outputs, _ = backbone.apply({'params': params, 'batch_stats': batch_stats}, images,
                                train=True, rngs={'dropout': jax.random.key(0)},
                                mutable=['batch_stats'])
    return sum(jnp.mean(jnp.square(out.astype(jnp.float32))) for out in outputs)

  def backward(variables, images):
    return jax.grad(loss)(variables['params'], variables['batch_stats'], images)

  return forward, backward


def abstract_variables(backbone, height: int, width: int):
  return jax.eval_shape(backbone.init, jax.random.key(0), jnp.zeros((1, height, width, 3)))


def time_alternately(group, runs: int, memory_limit: float) -> None:
  """Times the forward and forward+backward of each backbone in `group`, in alternation.

  `group` is a list of (entry, backbone, images): entry (a dict) receives for each mode
  ('forward', 'backward') `<mode>_s`, the minimum over `runs` calls after a warm-up call (None
  when not run), `<mode>_compile_s`, `<mode>_temp_bytes` (XLA's memory analysis) and
  `<mode>_flops` (XLA's cost analysis, which leaves out the native kernels' depthwise convs). Every
  program is compiled first; then each round calls every program once, so that the load of this
  shared machine, which drifts, weighs on all of them alike, and the minimum is the call least
  disturbed by other work. A program whose temporaries exceed `memory_limit` bytes is compiled
  but not run.
  """
  programs = []  # (entry, mode, compiled, arguments)
  for entry, backbone, images in group:
    variables = jax.jit(backbone.init)(jax.random.key(0, impl='rbg'), images[:1])
    for mode, fn in zip(('forward', 'backward'), forward_and_backward(backbone)):
      start = time.perf_counter()
      compiled = jax.jit(fn).lower(variables, images).compile()
      flops, memory = common.compiled_analyses(compiled)
      entry.update({f'{mode}_s': None, f'{mode}_compile_s': time.perf_counter() - start,
                    f'{mode}_temp_bytes': memory['temp_bytes'], f'{mode}_flops': flops})
      if memory['temp_bytes'] > memory_limit:
        print(f"  {entry['label']} {mode}: not run, needs {memory['temp_bytes'] / 2**30:.2f} GiB "
              'of temporaries (over --cpu_memory_limit)', flush=True)
      else:
        programs.append((entry, mode, compiled, (variables, images)))
  for round_index in range(runs + 1):  # Round 0 is the warm-up.
    for entry, mode, compiled, arguments in programs:
      start = time.perf_counter()
      jax.block_until_ready(compiled(*arguments))
      seconds = time.perf_counter() - start
      if round_index:
        entry[f'{mode}_s'] = min(seconds, entry[f'{mode}_s'] or seconds)
  for entry, mode, _, _ in programs:
    print(f"  {entry['label']} {mode}: {entry[f'{mode}_s'] * 1e3:.0f} ms "
          f"({entry[f'{mode}_temp_bytes'] / 2**30:.2f} GiB temporaries)", flush=True)


def tpu_measurement(variant, height, width, topology_name, global_batch, remat, overrides):
  """Memory per chip of the forward+backward compiled for a TPU slice (see the module doc)."""
  # Imported here: it turns the native CPU kernels off for the whole process (a TPU program
  # must not contain them), which the CPU timings above must not suffer.
  from benchmarks import tpu_compile  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  devices = topologies.get_topology_desc(platform='tpu', topology_name=topology_name).devices
  if global_batch % len(devices):
    raise SystemExit(f'--tpu_batch {global_batch} does not split over {len(devices)} chips')
  backbone = model_lib.create_backbone(variant, dtype=jnp.bfloat16, dwconv_impl='xla',
                                       remat=remat, **overrides)
  mesh = jax.sharding.Mesh(np.array(devices), ('data',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  by_batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  variables = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                           abstract_variables(backbone, height, width))
  images = jax.ShapeDtypeStruct((global_batch, height, width, 3), jnp.float32, sharding=by_batch)
  _, backward = forward_and_backward(backbone)
  return tpu_compile.compile_and_measure(jax.jit(backward).lower(variables, images), devices)


def previous_results(args) -> dict:
  """What --json already holds for the parts in --skip, so that measuring one part again keeps
  the others: ('cpu' or 'tpu', row label) -> its fields, 'padding' -> the padding rows. Empty
  when nothing is skipped, or the file is absent or of another variant, batch or slice."""
  if not args.skip or not args.json or not os.path.exists(args.json):
    return {}
  with open(args.json) as f:
    old = json.load(f)
  same = {key: getattr(args, key) for key in ('variant', 'batch', 'padding_batch', 'topology',
                                              'tpu_batch')}
  if any(old.get(key) != value for key, value in same.items()):
    print(f'{args.json} holds another setup ({same} differ): the skipped parts stay empty')
    return {}
  kept = {'padding': old['padding']}
  for entry in old['dense']:
    kept[('cpu', entry['label'])] = {k: v for k, v in entry.items()
                                     if k.startswith(('forward_', 'backward_'))}
    kept[('tpu', entry['label'])] = {k: v for k, v in entry.items() if k.startswith('tpu')}
  return kept


def images_of(batch: int, height: int, width: int) -> jax.Array:
  return jax.random.normal(jax.random.key(1), (batch, height, width, 3))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--variant', default='secvit_s', choices=sorted(model_lib.VARIANTS),
                      help='the backbone (default: secvit_s)')
  parser.add_argument('--sizes', type=size, nargs='+', default=[(512, 512), (800, 1344)],
                      help='input sizes of the cpu and tpu measurements, HEIGHTxWIDTH')
  parser.add_argument('--batch', type=int, default=1, help='images per CPU call at 512² and '
                      '800×1344')
  parser.add_argument('--padding_batch', type=int, default=8,
                      help='images per CPU call at 224² and 232×200')
  parser.add_argument('--runs', type=int, default=3, help='timed calls per figure (minimum)')
  parser.add_argument('--padding_runs', type=int, default=10,
                      help='timed calls per figure of the padding cost (minimum)')
  parser.add_argument('--cpu_memory_limit', type=float, default=8.0, metavar='GIB',
                      help='compile but do not run a CPU program needing more temporaries')
  parser.add_argument('--topology', default='v5e:2x4',
                      help='the TPU slice compiled for, without a TPU (default: v5e:2x4)')
  parser.add_argument('--tpu_batch', type=int, default=16, help='global batch on the TPU slice')
  parser.add_argument('--skip', nargs='*', default=[], choices=['cpu', 'tpu', 'padding'],
                      help='parts not to measure; with --json, the file keeps its figures of them')
  common.add_output_flags(parser)
  args = parser.parse_args()
  print(common.machine_description(), f'native CPU kernels: {cpu_kernels.use_native()}')
  results = {'variant': args.variant, 'batch': args.batch, 'padding_batch': args.padding_batch,
             'runs': args.runs, 'padding_runs': args.padding_runs, 'topology': args.topology,
             'tpu_batch': args.tpu_batch, 'dense': [], 'padding': []}
  previous = previous_results(args)
  dense = []  # (result entry, overrides)
  memory_limit = args.cpu_memory_limit * 2**30
  for height, width in args.sizes:
    group = []
    for label, overrides in CLUSTERINGS:
      backbone = model_lib.create_backbone(args.variant, **overrides)
      entry = {'size': [height, width], 'clustering': label,
               'clusters': list(backbone.clusters_per_stage(height, width)),
               'label': f'{height}x{width} {label}'}
      for part in set(args.skip) & {'cpu', 'tpu'}:
        entry.update(previous.get((part, entry['label']), {}))
      dense.append((entry, overrides))
      group.append((entry, backbone, images_of(args.batch, height, width)))
    results['dense'] += [entry for entry, _, _ in group]
    if 'cpu' not in args.skip:
      print(f'{args.variant} at {height}x{width}, CPU:', flush=True)
      time_alternately(group, args.runs, memory_limit)
      common.write_json(args.json, results)  # After each part: a failure later loses nothing.
  if 'padding' in args.skip:
    results['padding'] = previous.get('padding', [])
  else:
    print(f'{args.variant}, cost of padding, CPU:', flush=True)
    backbone = model_lib.create_backbone(args.variant)
    group = []
    for height, width in PADDING_SIZES:
      rows, cols = model_lib.stage_resolutions(height, width)[0]
      entry = {'size': [height, width],
               'clusters': list(backbone.clusters_per_stage(height, width)),
               'stage0_tokens': args.padding_batch * rows * cols, 'label': f'{height}x{width}'}
      results['padding'].append(entry)
      group.append((entry, backbone, images_of(args.padding_batch, height, width)))
    time_alternately(group, args.padding_runs, memory_limit)
    common.write_json(args.json, results)
  if 'tpu' not in args.skip:  # Last: see tpu_measurement.
    for entry, overrides in dense:
      for remat in (False, True):
        print(f"{args.variant} {entry['label']}{' with remat' if remat else ''}: compiling for "
              f'{args.topology}...', flush=True)
        measured = tpu_measurement(args.variant, *entry['size'], args.topology, args.tpu_batch,
                                   remat, overrides)
        entry['tpu_remat' if remat else 'tpu'] = measured
        common.write_json(args.json, results)
        print(f"  {measured['per_chip_bytes'] / 2**30:.2f} GiB per chip (fits: "
              f"{measured['fits']})", flush=True)
        if measured['fits']:  # Remat only where the program does not fit without it.
          break
  print()
  print_tables(results)


def clusters_text(clusters) -> str:
  return ', '.join(str(n) if n > 1 else 'global' for n in clusters)


def milliseconds(seconds) -> float | str:
  return '-' if seconds is None else seconds * 1e3


def dense_rows(results):
  def memory(tpu):
    if not tpu:
      return ['-', '-']
    return [tpu['per_chip_bytes'] / 2**30, 'yes' if tpu['fits'] else 'no']
  return [['x'.join(map(str, entry['size'])), entry['clustering'],
           clusters_text(entry['clusters']),
           entry['forward_flops'] / results['batch'] / 1e9 if 'forward_flops' in entry else '-',
           milliseconds(entry.get('forward_s')),
           milliseconds(entry.get('backward_s')),
           entry['backward_temp_bytes'] / 2**30 if 'backward_temp_bytes' in entry else '-']
          + memory(entry.get('tpu')) + memory(entry.get('tpu_remat'))
          for entry in results['dense']]


def padding_rows(results):
  reference = results['padding'][0]
  per_token = lambda entry, key: entry[key] / entry['stage0_tokens']
  rows = []
  for entry in results['padding']:
    row = ['x'.join(map(str, entry['size'])), clusters_text(entry['clusters']),
           entry['stage0_tokens']]
    for key, unit in (('forward_flops', 1e6), ('forward_s', 1e-6), ('backward_s', 1e-6)):
      row += ([per_token(entry, key) / unit,
               f'{per_token(entry, key) / per_token(reference, key):.3f}']
              if entry.get(key) is not None else ['-', '-'])
    rows.append(row)
  return rows


DENSE_HEADERS = ['input', 'clustering', 'clusters per stage', 'fwd GFLOP/img (XLA)', 'CPU fwd ms',
                 'CPU fwd+bwd ms', 'CPU fwd+bwd temp GiB', 'TPU GiB/chip', 'fits',
                 'TPU with remat GiB/chip', 'fits']
PADDING_HEADERS = ['input', 'clusters per stage', 'stage-0 tokens', 'fwd MFLOP/token (XLA)',
                   'vs 224²', 'fwd µs/token', 'vs 224²', 'fwd+bwd µs/token', 'vs 224²']


def print_tables(results) -> None:
  common.print_table(DENSE_HEADERS, dense_rows(results))
  if results['padding']:
    print()
    common.print_table(PADDING_HEADERS, padding_rows(results))


if __name__ == '__main__':
  host_memory.reexec_with_memory_settings()  # Measure as train.py runs.
  main()
