"""Depthwise convolution: the native CPU kernels and the shifted-slice sum against XLA's conv.

    python -m benchmarks.depthwise [--batch 8] [--json OUT]

Times the three implementations of `secvit_jax.model.depthwise_conv` ('native', 'shift', 'xla')
on every depthwise conv shape of secvit_s at 224×224 (the 3×3 `pos`, the 5×5 `lepe`, the FFN's
3×3 on 3C channels), forward and forward+backward (gradients for input and kernel). The model's
default is chosen from this table.
"""

from __future__ import annotations

from secvit_jax import host_memory
from secvit_jax import quiet

if __name__ == '__main__':  # First: before JAX and TensorFlow load (host_memory.py, quiet.py).
  host_memory.reexec_with_memory_settings()  # Measure as train.py runs.
  quiet.silence_startup_noise()

# pylint: disable=g-import-not-at-top,wrong-import-position,g-bad-import-order
import jax
import jax.numpy as jnp

from benchmarks import common
from secvit_jax import model as model_lib

# secvit_s at 224×224: (height = width, channels) of each stage.
STAGES = ((56, 64), (28, 128), (14, 256), (7, 512))
IMPLS = ('native', 'shift', 'xla')


def main() -> None:
  args = common.parse_layer_benchmark_args(__doc__)
  rows, results = [], []
  for stage, (size, channels) in enumerate(STAGES):
    for name, kernel_size, width in (('pos', 3, channels), ('lepe', 5, channels),
                                     ('ffn.dwconv', 3, 3 * channels)):
      x = jax.random.normal(jax.random.key(0), (args.batch, size, size, width))
      kernel = jax.random.normal(jax.random.key(1), (kernel_size, kernel_size, 1, width))
      entry = {'stage': stage, 'conv': name, 'shape': list(x.shape), 'kernel': kernel_size}
      for impl in IMPLS:
        forward = lambda x, k, impl=impl: model_lib.depthwise_conv(x, k, impl)
        backward = jax.grad(lambda x, k, impl=impl: jnp.sum(model_lib.depthwise_conv(x, k, impl)),
                            argnums=(0, 1))
        entry[f'{impl}_forward_ms'] = 1e3 * common.time_compiled(
            forward, x, kernel, runs=args.runs).median_s
        entry[f'{impl}_backward_ms'] = 1e3 * common.time_compiled(
            backward, x, kernel, runs=args.runs).median_s
      results.append(entry)
      rows.append([stage, name, 'x'.join(map(str, x.shape)), f'{kernel_size}x{kernel_size}'] +
                  [entry[f'{impl}_{pass_}_ms'] for pass_ in ('forward', 'backward')
                   for impl in IMPLS])
  common.print_table(['stage', 'conv', 'input', 'kernel'] +
                     [f'{impl} {pass_} ms' for pass_ in ('fwd', 'fwd+bwd') for impl in IMPLS],
                     rows)
  common.write_json(args.json, {'batch': args.batch, 'results': results})


if __name__ == '__main__':
  main()
