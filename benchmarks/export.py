"""Served classifiers side by side: JAX (jit, CPU) against the exported SavedModel and ONNX file.

    python -m benchmarks.export [--variants secvit_t secvit_s] [--batches 1 8] [--runs 10]
                                [--json benchmarks/results/export.json]

For each variant, a 1000-class classifier with random weights at 224×224 is written as a
checkpoint, exported by `secvit_jax.export` in both formats (checked against JAX as every export
is), and timed at each batch size in one process: JAX's jitted `model.apply` as `tasks.load_model` gives
it (on one CPU device: the native kernels), TensorFlow running the reloaded SavedModel's
signature, onnxruntime running the ONNX file (CPU provider, its default threads). Medians of
`--runs` calls after two warm-up calls; the export's own time (trace, conversion, save) is
reported apart.
"""

from __future__ import annotations

from secvit_jax import host_memory
from secvit_jax import quiet

if __name__ == '__main__':  # First: before JAX and TensorFlow load (host_memory.py, quiet.py).
  host_memory.reexec_with_memory_settings()  # Measure as train.py runs.
  quiet.silence_startup_noise()

# pylint: disable=g-import-not-at-top,wrong-import-position,g-bad-import-order
import argparse
import os
import shlex
import sys
import tempfile

import jax
import numpy as np

from benchmarks import common
from secvit_jax import checkpoints
from secvit_jax import export
from secvit_jax import tasks

SIDES = ('jax', 'saved_model', 'onnx')
HEADERS = ['variant', 'batch', 'JAX ms', 'SavedModel ms', 'ONNX ms', 'JAX img/s',
           'SavedModel img/s', 'ONNX img/s']


def random_checkpoint(variant: str, directory: str, size: int = 224, seed: int = 0) -> None:
  """A 1000-class `variant` classifier with normal(0, 0.02) weights (BatchNorm variances 1),
  written as a converted checkpoint evaluated at `size`."""
  info = checkpoints.ModelInfo(variant=variant, num_classes=1000, image_size=size)
  model = tasks.TASKS[info.task].build_model(info)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             np.zeros((1, size, size, 3), np.float32)))
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    if jax.tree_util.keystr(path).endswith("['var']"):
      return np.ones(shape.shape, np.float32)
    return (0.02 * rng.standard_normal(shape.shape)).astype(np.float32)

  checkpoints.save_variables(directory, jax.tree_util.tree_map_with_path(draw, shapes),
                             info.to_json())


def measure(variant: str, batches: list[int], runs: int, workdir: str) -> list[dict]:
  """One result per batch size: each side's median ms per batch, and the exports' figures."""
  checkpoint = os.path.join(workdir, variant)
  random_checkpoint(variant, checkpoint)
  exports = {}
  for format in export.FORMATS:
    out = os.path.join(workdir, f'{variant}_{format}')
    metadata = export.export(checkpoint, out, format=format)
    exports[format] = {'run': export.RUNNERS[format](out), 'metadata': metadata}
    print(f'{variant}: exported as {format} in {metadata["export_seconds"]} s', file=sys.stderr)
  model, variables = tasks.load_model(checkpoint)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  rng = np.random.default_rng(0)
  results = []
  for batch in batches:
    images = rng.standard_normal((batch, 224, 224, 3)).astype(np.float32)
    calls = {'jax': lambda: jax.block_until_ready(apply(variables, images)),
             **{format: (lambda run=entry['run']: run(images))
                for format, entry in exports.items()}}
    seconds = {side: common.median_call_seconds(calls[side], runs=runs, warmup=2)
               for side in SIDES}
    results.append({'variant': variant, 'batch': batch,
                    **{f'{side}_ms': 1e3 * s for side, s in seconds.items()},
                    **{f'{side}_images_per_s': batch / s for side, s in seconds.items()}})
  for format, entry in exports.items():
    results[0][f'{format}_export_s'] = entry['metadata']['export_seconds']
    results[0][f'{format}_checks'] = entry['metadata']['checks']
  return results


def table_rows(results: list[dict]) -> list[list]:
  return [[r['variant'], r['batch'], *(r[f'{side}_ms'] for side in SIDES),
           *(r[f'{side}_images_per_s'] for side in SIDES)] for r in results]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--variants', nargs='+', default=['secvit_t', 'secvit_s'],
                      help='classifier variants to export and time')
  parser.add_argument('--batches', nargs='+', type=int, default=[1, 8],
                      help='batch sizes to time each variant at')
  parser.add_argument('--runs', type=int, default=10, help='timed calls per figure (median)')
  common.add_output_flags(parser)
  args = parser.parse_args()
  print(common.machine_description())
  results = []
  with tempfile.TemporaryDirectory() as workdir:
    for variant in args.variants:
      results += measure(variant, args.batches, args.runs, workdir)
  common.print_table(HEADERS, table_rows(results))
  common.write_json(args.json, {
      'command': 'python -m benchmarks.export ' + shlex.join(sys.argv[1:]),
      'runs': args.runs, 'threads': os.cpu_count(), 'results': results})


if __name__ == '__main__':
  main()
