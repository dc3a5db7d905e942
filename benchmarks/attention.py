"""The attention from the qkv projection, through XLA against the fused CPU kernel.

    python -m benchmarks.attention [--batch 8] [--runs 5] [--json OUT]

For each stage of secvit_t/secvit_s at 224×224 (stage 0: 56×56 tokens, 2 heads of 32, 32 clusters
of 98; stage 1: 28×28, 4 heads, 8 clusters; stage 2: 14×14, 8 heads, 2 clusters; stage 3: 7×7, 16
heads, all 49 tokens), times what `SECAttention` computes between its qkv projection and LePE:
the head split, RoPE and the key scale, the semantic sort, attention inside the clusters and the
head merge. 'XLA' is `sec.xla_attention_from_qkv` (`attention_impl='einsum'`), 'fused' is
`sec.fused_cluster_attention` (the sort in XLA, the rest one native kernel per pass); forward,
and forward with the gradient with respect to qkv. The fused path runs on one CPU device only.
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
from secvit_jax import sec

# (side, channels, heads, clusters) of each stage at 224×224; secvit_t and secvit_s share them.
STAGES = ((56, 64, 2, 32), (28, 128, 4, 8), (14, 256, 8, 2), (7, 512, 16, -1))


def xla_attention(tokens, sin, cos, heads, num_clusters):
  return sec.xla_attention_from_qkv(tokens, sin, cos, heads, num_clusters, 'einsum')[0]


def fused_attention(tokens, sin, cos, heads, num_clusters):
  return sec.fused_cluster_attention(tokens, sin, cos, heads, num_clusters)[0]


def timings(function, tokens, sin, cos, heads, clusters, runs):
  """Forward and forward+backward ms (medians) of function on qkv rows."""
  forward = lambda t: function(t, sin, cos, heads, clusters)
  cotangent = jnp.ones(tokens.shape[:2] + (tokens.shape[2] // 3,), tokens.dtype)
  backward = lambda t: jax.vjp(forward, t)[1](cotangent)[0]
  return (1e3 * common.time_compiled(forward, tokens, runs=runs).median_s,
          1e3 * common.time_compiled(backward, tokens, runs=runs).median_s)


HEADERS = ['stage', 'tokens', 'heads', 'clusters', 'XLA fwd ms', 'fused fwd ms', 'XLA/fused',
           'XLA fwd+bwd ms', 'fused fwd+bwd ms', 'XLA/fused']


def table_rows(results: list[dict]) -> list[list]:
  """HEADERS' rows from the JSON's results (this script's table and the README's)."""
  rows = []
  for r in results:
    side = int(round(r['tokens'] ** 0.5))
    rows.append([r['stage'], f'{side}x{side}', r['heads'], r['clusters'], r['xla_forward_ms'],
                 r['fused_forward_ms'], r['xla_forward_ms'] / r['fused_forward_ms'],
                 r['xla_backward_ms'], r['fused_backward_ms'],
                 r['xla_backward_ms'] / r['fused_backward_ms']])
  return rows


def main() -> None:
  args = common.parse_layer_benchmark_args(__doc__)
  results = []
  for stage, (side, channels, heads, clusters) in enumerate(STAGES):
    tokens = jax.random.normal(jax.random.key(stage), (args.batch, side * side, 3 * channels))
    sin, cos = (jnp.asarray(t) for t in model_lib.rope_tables(side, side, channels // heads))
    if not sec.fused_attention_applies(tokens.shape, heads, clusters, 'auto', tokens.dtype):
      raise SystemExit('the fused attention does not run here: it needs one CPU device and the '
                       'native kernels (secvit_jax/cpu_kernels.py)')
    xla = timings(xla_attention, tokens, sin, cos, heads, clusters, args.runs)
    fused = timings(fused_attention, tokens, sin, cos, heads, clusters, args.runs)
    results.append({'stage': stage, 'tokens': side * side, 'heads': heads, 'clusters': clusters,
                    'xla_forward_ms': xla[0], 'xla_backward_ms': xla[1],
                    'fused_forward_ms': fused[0], 'fused_backward_ms': fused[1]})
  print(f'\nAttention from qkv rows, batch {args.batch}, float32: XLA against the fused kernel\n')
  common.print_table(HEADERS, table_rows(results))
  common.write_json(args.json, {'batch': args.batch, 'machine': common.machine_description(),
                                'results': results})


if __name__ == '__main__':
  main()
