"""XLA's cost and memory analysis of the compiled forward pass and train step.

    python -m benchmarks.compiled_cost --variants secvit_s [--batch 8] [--json OUT]

FLOPs per image come from the compiled program's `cost_analysis()` and are set against the
analytic count: the release's fvcore count (multiply-accumulates of convolutions and
matmuls at 224×224) × 2 FLOPs per MAC for the forward pass, and about 3× that for a train step
(forward, plus two matmuls per matmul in the backward pass). XLA also counts elementwise work
(normalizations, GELU, softmax, the optimizer), so it lands a few percent above; a gather written
as a one-hot matmul, or recomputation, would show as a far larger excess. Memory per image comes
from `memory_analysis()`: arguments, outputs and temporaries of the compiled program.
"""

from __future__ import annotations

from secvit_jax import host_memory
from secvit_jax import quiet

if __name__ == '__main__':  # First: before JAX and TensorFlow load (host_memory.py, quiet.py).
  host_memory.reexec_with_memory_settings()  # Measure as train.py runs.
  quiet.silence_startup_noise()

# pylint: disable=g-import-not-at-top,wrong-import-position,g-bad-import-order
import argparse

import jax
import jax.numpy as jnp

from benchmarks import common
from secvit_jax import model as model_lib

# fvcore's count of the release's model at 224×224, in G multiply-accumulates, measured on the
# release's code (the paper reports 2.5 / 4.4 / 9.7 / 18.1 GFLOPs for T / S / B / L).
RELEASE_GMACS = {'secvit_t': 2.72, 'secvit_s': 4.76, 'secvit_b': 10.41, 'secvit_l': 19.39}


def matmul_flops(fn, *args) -> float:
  """FLOPs of the matmuls and convolutions in `fn`'s jaxpr (2 per multiply-accumulate).

  The counterpart of fvcore's count in our own program: a one-hot gather or a recomputed block
  would raise it above the analytic count, while elementwise work (which XLA counts too) does not.
  """
  def count(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general':
        (lhs_contract, _), _ = eqn.params['dimension_numbers']
        lhs = eqn.invars[0].aval.shape
        contracted = 1
        for dim in lhs_contract:
          contracted *= lhs[dim]
        out = 1
        for dim in eqn.outvars[0].aval.shape:
          out *= dim
        total += 2.0 * out * contracted
      elif eqn.primitive.name == 'conv_general_dilated':
        rhs = eqn.invars[1].aval.shape
        out_feature_dim = eqn.params['dimension_numbers'].rhs_spec[0]
        out = 1
        for dim in eqn.outvars[0].aval.shape:
          out *= dim
        window_and_in = 1  # Each output sums window × (input features / groups) products.
        for index, dim in enumerate(rhs):
          if index != out_feature_dim:
            window_and_in *= dim
        total += 2.0 * out * window_and_in
      for param in eqn.params.values():
        inner = getattr(param, 'jaxpr', param)
        if hasattr(inner, 'eqns'):
          total += count(inner)
    return total
  return count(jax.make_jaxpr(fn)(*args).jaxpr)


def compile_forward(variant: str, batch: int, size: int, dtype: str):
  """(compiled forward pass, its matmul + conv FLOPs)."""
  model = model_lib.create_model(variant, dtype=jnp.dtype(dtype))
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  forward = lambda v, x: model.apply(v, x, train=False)
  return (jax.jit(forward).lower(variables, images).compile(),
          matmul_flops(forward, variables, images))


def compile_train_step(variant: str, batch: int, size: int, dtype: str):
  """(compiled train step of `train_lib`, its matmul + conv FLOPs)."""
  _, setup = common.one_device_train_setup(variant, batch, size, dtype)
  return (setup.train_step.lower(setup.abstract_state, setup.abstract_batch).compile(),
          matmul_flops(setup.train_step, setup.abstract_state, setup.abstract_batch))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--variants', nargs='+', default=['secvit_s'],
                      choices=sorted(model_lib.VARIANTS), help='models to compile')
  parser.add_argument('--batch', type=int, default=8, help='images per batch')
  parser.add_argument('--size', type=int, default=224, help='image height and width')
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'],
                      help='compute dtype (parameters stay float32)')
  common.add_output_flags(parser)
  args = parser.parse_args()
  print(common.machine_description())
  rows, results = [], []
  for variant in args.variants:
    analytic_forward = 2e9 * RELEASE_GMACS[variant] * (args.size / 224) ** 2
    for mode, compile_fn, analytic in (('forward', compile_forward, analytic_forward),
                                       ('train step', compile_train_step, 3 * analytic_forward)):
      compiled, traced_flops = compile_fn(variant, args.batch, args.size, args.dtype)
      flops, memory = common.compiled_analyses(compiled)
      per_image = flops / args.batch
      entry = {'variant': variant, 'mode': mode, 'batch': args.batch, 'size': args.size,
               'dtype': args.dtype, 'flops_per_image': per_image,
               'analytic_flops_per_image': analytic, 'ratio_to_analytic': per_image / analytic,
               'matmul_conv_flops_per_image': traced_flops / args.batch,
               **{f'{k}_per_image': v / args.batch for k, v in memory.items()}}
      results.append(entry)
      rows.append([variant, mode, per_image / 1e9, traced_flops / args.batch / 1e9,
                   analytic / 1e9, per_image / analytic,
                   memory['argument_bytes'] / args.batch / 2**20,
                   memory['output_bytes'] / args.batch / 2**20,
                   memory['temp_bytes'] / args.batch / 2**20])
      print(f'{variant} {mode}: {per_image / 1e9:.2f} GFLOP/image', flush=True)
  common.print_table(['variant', 'mode', 'GFLOP/image (XLA)', 'matmul+conv GFLOP/image',
                      'GFLOP/image (analytic)',
                      'XLA/analytic', 'argument MiB/image', 'output MiB/image',
                      'temp MiB/image'], rows)
  common.write_json(args.json, {'results': results})


if __name__ == '__main__':
  main()
