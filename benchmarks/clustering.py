"""Cost of semantic equitable clustering against plain fixed windows of the same size.

    python -m benchmarks.clustering [--batch 8] [--json OUT]

For each clustering stage of secvit_s at 224×224 (stage 0: 56×56 tokens, 2 heads, 32 clusters;
stage 1: 28×28, 4 heads, 8; stage 2: 14×14, 8 heads, 2), times:
- the whole attention layer (`SECAttention`: qkv, LePE, RoPE, clustered attention, out_proj) and
  the same layer with the sort and gathers removed (attention inside consecutive fixed windows of
  the same size), forward and forward+backward;
- the pieces of the clustering: the sort (scores + argsort), the gathers (inverse permutation,
  three permutes in, one out) and the attention inside the clusters;
- the permutation's backward: the custom gather-with-inverse VJP against autodiff's scatter-add.
"""

from __future__ import annotations

from secvit_jax import host_memory
from secvit_jax import quiet

if __name__ == '__main__':  # First: before JAX and TensorFlow load (host_memory.py, quiet.py).
  host_memory.reexec_with_memory_settings()  # Measure as train.py runs.
  quiet.silence_startup_noise()

# pylint: disable=g-import-not-at-top,wrong-import-position,g-bad-import-order
from unittest import mock

import jax
import jax.numpy as jnp

from benchmarks import common
from secvit_jax import model as model_lib
from secvit_jax import sec

# secvit_s at 224×224: (side, channels, heads, clusters) of the clustering stages.
STAGES = ((56, 64, 2, 32), (28, 128, 4, 8), (14, 256, 8, 2))


def window_attention(q, k, v, num_clusters):
  """The baseline: attention inside consecutive fixed windows, no sort, no gather."""
  shape = q.shape[:2] + (num_clusters, q.shape[2] // num_clusters, q.shape[3])
  out = sec.softmax_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape))
  return out.reshape(q.shape), None


def autodiff_permute(x, order, inverse):
  del inverse
  return jnp.take_along_axis(x, order[..., None], axis=2)


def layer_timings(x, heads, clusters, runs):
  """Forward and forward+backward ms of SECAttention, clustered and windowed."""
  # The XLA path in both modes ('einsum'; the CPU's fused kernel would bypass the patched op).
  layer = model_lib.SECAttention(heads, clusters, attention_impl='einsum')
  sin, cos = model_lib.rope_tables(x.shape[1], x.shape[2], x.shape[3] // heads)
  params = layer.init(jax.random.key(0), x, sin, cos)
  forward = lambda p, x: layer.apply(p, x, sin, cos)
  backward = jax.grad(lambda p, x: jnp.sum(forward(p, x) ** 2), argnums=(0, 1))
  timings = {}
  for mode in ('sec', 'window'):
    # The window baseline swaps the clustering op for fixed windows inside the real layer.
    patch = (mock.patch.object(model_lib.sec, 'cluster_attention', window_attention)
             if mode == 'window' else mock.patch.object(model_lib.sec, 'cluster_attention',
                                                        sec.cluster_attention))
    with patch:
      timings[f'{mode}_forward_ms'] = 1e3 * common.time_compiled(
          forward, params, x, runs=runs).median_s
      timings[f'{mode}_backward_ms'] = 1e3 * common.time_compiled(
          backward, params, x, runs=runs).median_s
  return timings


def piece_timings(q, k, v, clusters, runs):
  """Forward ms of the sort, the gathers and the clustered attention, timed apart."""
  order = sec.semantic_sort_order(k)
  inverse = sec.inverse_permutation(order)
  shape = q.shape[:2] + (clusters, q.shape[2] // clusters, q.shape[3])

  def gathers(q, k, v, order):
    inverse = sec.inverse_permutation(order)
    permuted = [sec.permute_tokens(t, order, inverse) for t in (q, k, v)]
    return sec.permute_tokens(permuted[0], inverse, order), permuted[1], permuted[2]

  def clustered_attention(q, k, v):
    return sec.softmax_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape))

  def permute_grad(permute):
    return jax.grad(lambda t: jnp.sum(permute(t, order, inverse) * q))

  ms = lambda fn, *a: 1e3 * common.time_compiled(fn, *a, runs=runs).median_s
  return {
      'sort_ms': ms(sec.semantic_sort_order, k),
      'gathers_ms': ms(gathers, q, k, v, order),
      'attention_ms': ms(clustered_attention, q, k, v),
      'permute_backward_custom_ms': ms(permute_grad(sec.permute_tokens), v),
      'permute_backward_autodiff_ms': ms(permute_grad(autodiff_permute), v),
  }


def main() -> None:
  args = common.parse_layer_benchmark_args(__doc__)
  results, layer_rows, piece_rows = [], [], []
  for stage, (side, channels, heads, clusters) in enumerate(STAGES):
    x = jax.random.normal(jax.random.key(stage), (args.batch, side, side, channels))
    q, k, v = (jax.random.normal(jax.random.key(10 + i),
                                 (args.batch, heads, side * side, channels // heads))
               for i in range(3))
    entry = {'stage': stage, 'tokens': side * side, 'heads': heads, 'clusters': clusters,
             **layer_timings(x, heads, clusters, args.runs),
             **piece_timings(q, k, v, clusters, args.runs)}
    results.append(entry)
    layer_rows.append([
        stage, f'{side}x{side}', heads, clusters,
        entry['sec_forward_ms'], entry['window_forward_ms'],
        entry['sec_forward_ms'] / entry['window_forward_ms'],
        entry['sec_backward_ms'], entry['window_backward_ms'],
        entry['sec_backward_ms'] / entry['window_backward_ms']])
    piece_rows.append([stage, entry['sort_ms'], entry['gathers_ms'], entry['attention_ms'],
                       entry['permute_backward_custom_ms'],
                       entry['permute_backward_autodiff_ms']])
  print(f'\nAttention layer, batch {args.batch}: clustering (SEC) against fixed windows\n')
  common.print_table(['stage', 'tokens', 'heads', 'clusters', 'SEC fwd ms', 'window fwd ms',
                      'SEC/window', 'SEC fwd+bwd ms', 'window fwd+bwd ms', 'SEC/window'],
                     layer_rows)
  print('\nPieces of the clustering, forward\n')
  common.print_table(['stage', 'sort ms', 'gathers ms', 'attention ms',
                      'permute bwd (inverse gather) ms', 'permute bwd (scatter-add) ms'],
                     piece_rows)
  common.write_json(args.json, {'batch': args.batch, 'results': results})


if __name__ == '__main__':
  main()
