"""Model throughput: forward (eval) and the full train step, per variant, batch, size and dtype.

    python -m benchmarks.throughput --variants secvit_s --batch 8 --dtypes float32 [--json OUT]

The forward pass is `model.apply(variables, images, train=False)`; the train step is the real one
of `secvit_jax.train_lib` (Mixup/CutMix, forward and backward with stochastic depth, AdamW with
the recipe's schedule and weight-decay mask, EMA), built from the variant's config on a
one-device mesh. Each figure is the median of --runs calls after compilation; compile time is
reported apart. Reference, the release's PyTorch model on a 2-core CPU (float32, 224×224,
batch 8): secvit_s forward 6.85 img/s, train step 2.56 img/s; secvit_t forward 12.1 img/s.
"""

from __future__ import annotations

import argparse
import importlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from secvit_jax import hugepages
from secvit_jax import model as model_lib
from secvit_jax import sharding
from secvit_jax import train_lib
from secvit_jax.data import sources
from secvit_jax.tasks import classification

RELEASE_CPU_IMG_PER_S = {('secvit_s', 'forward'): 6.85, ('secvit_s', 'train step'): 2.56,
                         ('secvit_t', 'forward'): 12.1}


def one_device_train_setup(variant: str, batch: int, size: int,
                           dtype: str) -> train_lib.TrainSetup:
  """The variant's ImageNet config at this batch, size and dtype, set up on one device."""
  config = importlib.import_module(f'configs.{variant}').get_config()
  config.batch_size = batch
  config.image_size = size
  config.dtype = dtype
  config.mesh.data, config.mesh.fsdp = 1, 1
  info = sources.DatasetInfo(num_classes=1000, num_train_examples=1_281_167,
                             num_eval_examples=50_000)
  mesh = sharding.create_mesh(config.mesh, jax.devices()[:1])
  return train_lib.create_train_setup(config, mesh, classification.ClassificationTask(config, info))


def measure_forward(variant, batch, size, dtype, runs):
  model = model_lib.create_model(variant, dtype=jnp.dtype(dtype))
  images = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
  variables = jax.jit(lambda: model.init(jax.random.key(0), images[:1], train=False))()
  return common.time_compiled(lambda v, x: model.apply(v, x, train=False), variables, images,
                              runs=runs)


def measure_train_step(variant, batch, size, dtype, runs):
  setup = one_device_train_setup(variant, batch, size, dtype)
  state = setup.init_state()
  batch_arrays = {
      'image': jax.random.normal(jax.random.key(1), (batch, size, size, 3)),
      'label': jax.random.randint(jax.random.key(2), (batch,), 0, 1000),
  }
  start = time.perf_counter()
  compiled = setup.train_step.lower(setup.abstract_state, setup.abstract_batch).compile()
  compile_s = time.perf_counter() - start
  # The step donates its state: each call takes the state the previous one returned.
  times = []
  for index in range(runs + 1):
    start = time.perf_counter()
    state, metrics = compiled(state, batch_arrays)
    jax.block_until_ready(metrics)
    if index:  # The first call is a warm-up.
      times.append(time.perf_counter() - start)
  return common.Timing(compile_s, float(np.median(times)), runs)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--variants', nargs='+', default=['secvit_t', 'secvit_s'],
                      choices=sorted(model_lib.VARIANTS))
  parser.add_argument('--batch', type=int, nargs='+', default=[8])
  parser.add_argument('--size', type=int, nargs='+', default=[224])
  parser.add_argument('--dtypes', nargs='+', default=['float32'],
                      choices=['float32', 'bfloat16'])
  parser.add_argument('--modes', nargs='+', default=['forward', 'train step'],
                      choices=['forward', 'train step'])
  parser.add_argument('--runs', type=int, default=5)
  common.add_output_flags(parser)
  args = parser.parse_args()
  print(common.machine_description())
  rows, results = [], []
  for variant in args.variants:
    for batch in args.batch:
      for size in args.size:
        for dtype in args.dtypes:
          for mode in args.modes:
            measure = measure_forward if mode == 'forward' else measure_train_step
            timing = measure(variant, batch, size, dtype, args.runs)
            compile_s, seconds = timing.compile_s, timing.median_s
            reference = RELEASE_CPU_IMG_PER_S.get((variant, mode))
            images_per_s = batch / seconds
            speedup = images_per_s / reference if reference and (
                size, dtype, batch) == (224, 'float32', 8) else None
            results.append({'variant': variant, 'mode': mode, 'batch': batch, 'size': size,
                            'dtype': dtype, 'step_s': seconds, 'images_per_s': images_per_s,
                            'compile_s': compile_s, 'release_images_per_s': reference,
                            'speedup_over_release': speedup})
            rows.append([variant, mode, batch, size, dtype, seconds * 1e3, images_per_s,
                         compile_s, reference or '-', f'{speedup:.2f}x' if speedup else '-'])
            print(f'{variant} {mode} batch {batch} {size}px {dtype}: {images_per_s:.2f} img/s',
                  flush=True)
  common.print_table(['variant', 'mode', 'batch', 'size', 'dtype', 'ms/step', 'img/s',
                      'compile s', 'release img/s', 'speed-up'], rows)
  common.write_json(args.json, {'results': results})


if __name__ == '__main__':
  hugepages.reexec_with_huge_pages()  # Measure as train.py runs.
  main()
