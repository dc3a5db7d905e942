"""secvit_s bfloat16 training on one GPU against the release under torch AMP; cuDNN attention.

    python -m benchmarks.gpu --release PATH --json benchmarks/results/gpu.json
    python -m benchmarks.gpu --release PATH --dry-run    # the same code, toy sizes, CPU is fine

One run of a few minutes on one GPU (sized for an H200 with 16 host cores: the two JAX train
steps compile at once, in a minute or two; the timed turns and the attention take seconds):
1. The train step of secvit_s at batch 128, 224×224: this project's recipe step
   (`benchmarks.common.one_device_train_setup`) in bfloat16, once with the attention inside the
   clusters through the einsum path and once through cuDNN, against the release's model under
   torch AMP as its engine.py trains (autocast float16 and a GradScaler; `cudnn.benchmark`), the
   same Mixup/CutMix, AdamW and EMA. Each runs in its own warm worker process on the same GPU
   (`benchmarks.throughput`'s workers: JAX without preallocation, so that the three share the
   device and each allocator's peak is its own), in alternating turns; the table gives img/s
   (minimum over --repeats turns) and each side's peak device memory.
2. The clustered attention alone at secvit_s's four stages (batch 128, bfloat16): the einsum path
   (`sec.softmax_attention`) against cuDNN's fused kernel (`jax.nn.dot_product_attention` with
   implementation='cudnn', clusters folded into the batch), forward and forward+backward ms, and
   the largest difference between their outputs.
The faster train step decides which path `attention_impl='auto'` takes on GPUs: the script
prints the line to set in secvit_jax/sec.py (AUTO_ATTENTION['gpu']).

Without a GPU, or with --dry-run, it runs at toy sizes (batch 2, 64×64, float32 for the
release) on whatever device JAX and torch find, and skips cuDNN with a message where there is no
CUDA GPU; figures from a dry run measure nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from benchmarks import throughput

VARIANT = 'secvit_s'
# secvit_s at 224×224: (tokens per side, heads, clusters) of each stage; head_dim 32.
STAGES = ((56, 2, 32), (28, 4, 8), (14, 8, 2), (7, 16, 1))
HEAD_DIM = 32
# JAX workers share the GPU with torch: allocate as needed, so that each peak is the real one.
JAX_GPU_ENV = {'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}


def gpu_present() -> bool:
  """Whether torch sees a CUDA GPU. Asked of torch: JAX's backend would take device memory in this
  process before the workers run."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return torch.cuda.is_available()


def attention_timings(batch: int, dtype: str, with_cudnn: bool, repeats: int,
                      scale: int = 1) -> list[dict[str, Any]]:
  """Forward and forward+backward ms of the two attention paths at each stage's shapes.

  `scale` divides each stage's side (toy sizes for a dry run). Runs on JAX's default backend.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from secvit_jax import sec  # pylint: disable=g-import-not-at-top

  def best_ms(fn, *args):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - start)
    return 1e3 * min(times)

  rows = []
  for stage, (side, heads, clusters) in enumerate(STAGES):
    tokens = max(1, side // scale) ** 2
    clusters = min(clusters, tokens)
    shape = (batch, heads, clusters, tokens // clusters, HEAD_DIM)
    q, k, v, cotangent = (
        jax.random.normal(jax.random.key(i), shape, jnp.float32).astype(dtype) * 0.5
        for i in range(4))
    row = {'stage': stage, 'shape': list(shape)}
    outputs = {}
    for impl in ('einsum', 'cudnn') if with_cudnn else ('einsum',):
      forward = jax.jit(lambda q, k, v, impl=impl: sec.softmax_attention(q, k, v, impl=impl))
      backward = jax.jit(jax.grad(
          lambda q, k, v, impl=impl: jnp.sum(
              sec.softmax_attention(q, k, v, impl=impl).astype(jnp.float32) *
              cotangent.astype(jnp.float32)), argnums=(0, 1, 2)))
      outputs[impl] = forward(q, k, v).astype(jnp.float32)
      row[f'{impl}_forward_ms'] = best_ms(forward, q, k, v)
      row[f'{impl}_forward_backward_ms'] = best_ms(backward, q, k, v)
    if with_cudnn:
      row['max_abs_difference'] = float(jnp.max(jnp.abs(outputs['cudnn'] - outputs['einsum'])))
    rows.append(row)
    print(f'attention stage {stage} {shape}: ' + ', '.join(
        f'{key} {value:.3g}' for key, value in row.items() if key.endswith(('_ms', 'difference'))),
          flush=True)
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--release', metavar='PATH', required=True,
                      help='a checkout of the release repository (its classfication_release/)')
  parser.add_argument('--batch', type=int, default=128, help='images per train step')
  parser.add_argument('--repeats', type=int, default=5, help='timed turns per side (minimum)')
  parser.add_argument('--dry-run', action='store_true',
                      help='toy sizes, to check the script anywhere (its figures mean nothing)')
  parser.add_argument('--json', metavar='PATH', help='also write the results as JSON here')
  args = parser.parse_args(argv)
  on_gpu = gpu_present()
  toy = args.dry_run or not on_gpu
  if not on_gpu:
    print('no CUDA GPU here: a dry run at toy sizes on the CPU, cuDNN attention skipped '
          "(jax.nn.dot_product_attention(implementation='cudnn') needs a CUDA GPU)", flush=True)
  batch, size, repeats = (2, 64, 2) if toy else (args.batch, 224, args.repeats)
  threads = min(os.cpu_count() or 1, 16)
  impls = ('einsum', 'cudnn') if on_gpu else ('einsum',)
  command = 'python -m benchmarks.gpu ' + ' '.join(sys.argv[1:] if argv is None else argv)

  workers: dict[str, throughput.Worker] = {}
  prepared: dict[str, dict[str, Any]] = {}
  try:
    for impl in impls:  # Both compile at once, each in its worker.
      label = f'project ({impl} attention)'
      workers[label] = throughput.Worker('project', label=label, threads=threads,
                                         env=JAX_GPU_ENV)
      workers[label].start('prepare', VARIANT, 'train step', batch, size, 'bfloat16', 2,
                           {'attention_impl': impl})
    for label, worker in workers.items():
      prepared[label] = worker.finish('prepare')
      print(f'{label}: compiled in {prepared[label]["compile_s"]:.0f} s', flush=True)
    mixing = next(iter(prepared.values()))['mixing']
    label = 'release (torch AMP float16)' if on_gpu else 'release (float32, CPU)'
    workers[label] = throughput.Worker(
        'release', label=label, threads=threads, checkout=args.release,
        device='cuda' if on_gpu else 'cpu', amp_dtype='float16' if on_gpu else None)
    prepared[label] = workers[label].call('prepare', VARIANT, 'train step', batch, size, mixing,
                                          2)
    sides = {name: worker.call('describe') for name, worker in workers.items()}
    times = throughput.alternate(workers, repeats, turn_warmup=1)
    train_rows = []
    for name, worker in workers.items():
      summary = throughput.side_summary(batch, times[name], prepared[name])
      summary.update(side=name, peak_memory_bytes=worker.call('peak_memory_bytes'))
      train_rows.append(summary)
  finally:
    for worker in workers.values():
      worker.close()

  device = next(iter(sides.values()))['device']
  print(f'\n{VARIANT} train step, batch {batch}, {size}×{size}, {device}'
        f'{" (DRY RUN: toy sizes, no meaning)" if toy else ""}:\n')
  print('| side | img/s | peak memory GiB | compile s |\n|---|---|---|---|')
  for row in train_rows:
    memory = (f"{row['peak_memory_bytes'] / 2**30:.1f}" if row['peak_memory_bytes'] is not None
              else '-')
    print(f"| {row['side']} | {row['images_per_s']:.1f} | {memory} | {row['compile_s']:.0f} |")

  os.environ.update(JAX_GPU_ENV)  # The workers have left the device; JAX starts here now.
  attention = attention_timings(2 if toy else batch, 'bfloat16', on_gpu, repeats,
                                scale=4 if toy else 1)
  faster = None
  if on_gpu:
    speed = {row['side']: row['images_per_s'] for row in train_rows}
    faster = max(impls, key=lambda impl: speed[f'project ({impl} attention)'])
    print(f"\nfaster train step: attention_impl='{faster}'. "
          f"{'Measured at toy sizes: decide on a full run.' if toy else ''}\n"
          f"In secvit_jax/sec.py set AUTO_ATTENTION['gpu'] = '{faster}' "
          '(and record the figures above in the README).')
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump({'command': command, 'dry_run': toy, 'variant': VARIANT, 'batch': batch,
                 'size': size, 'sides': sides, 'train_step': train_rows,
                 'attention': attention, 'faster_attention_impl': faster}, f, indent=2)
    print(f'wrote {args.json}')


if __name__ == '__main__':
  from secvit_jax import host_memory  # pylint: disable=g-import-not-at-top
  from secvit_jax import quiet  # pylint: disable=g-import-not-at-top
  # As the CPU benchmarks run (it only touches host memory).
  host_memory.reexec_with_memory_settings()
  quiet.silence_startup_noise()  # Before JAX starts here (for the attention timings).
  main()
