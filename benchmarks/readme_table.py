"""Writes the README's results section from the JSON files the benchmark scripts wrote.

    python -m benchmarks.readme_table [--results benchmarks/results] [--readme README.md]

Reads throughput.json, depthwise.json, clustering.json, compiled_cost.json and tpu_*.json (any
that exist) and replaces the text between the README's `<!-- results:start -->` and `<!-- results:end -->`.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

START, END = '<!-- results:start -->', '<!-- results:end -->'


def _table(headers, rows):
  cell = lambda v: f'{v:.3g}' if isinstance(v, float) else str(v)
  lines = ['| ' + ' | '.join(headers) + ' |', '|' + '|'.join('---' for _ in headers) + '|']
  lines += ['| ' + ' | '.join(cell(v) for v in row) + ' |' for row in rows]
  return '\n'.join(lines)


def _load(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def render(results_dir: str) -> str:
  parts = []
  throughput = _load(os.path.join(results_dir, 'throughput.json'))
  if throughput:
    rows = [[r['variant'], r['mode'], r['batch'], r['size'], r['dtype'], r['images_per_s'],
             r['compile_s'], r['release_images_per_s'] or '-',
             f"{r['speedup_over_release']:.2f}×" if r['speedup_over_release'] else '-']
            for r in throughput['results']]
    parts.append(f"**Throughput** (`python -m benchmarks.throughput`), {throughput['machine']}:\n\n"
                 + _table(['variant', 'mode', 'batch', 'size', 'dtype', 'img/s', 'compile s',
                           'release img/s', 'vs release'], rows))
  depthwise = _load(os.path.join(results_dir, 'depthwise.json'))
  if depthwise:
    impls = ('native', 'shift', 'xla')
    rows = [[r['stage'], r['conv'], 'x'.join(map(str, r['shape'])), f"{r['kernel']}x{r['kernel']}"]
            + [r[f'{impl}_{pass_}_ms'] for pass_ in ('forward', 'backward') for impl in impls]
            for r in depthwise['results']]
    parts.append(f"**Depthwise convolutions**, secvit_s at 224×224, batch {depthwise['batch']}, ms "
                 f"(`python -m benchmarks.depthwise`), {depthwise['machine']}:\n\n"
                 + _table(['stage', 'conv', 'input', 'kernel']
                          + [f'{impl} {pass_}' for pass_ in ('fwd', 'fwd+bwd') for impl in impls],
                          rows))
  clustering = _load(os.path.join(results_dir, 'clustering.json'))
  if clustering:
    rows = [[r['stage'], r['tokens'], r['clusters'], r['sec_forward_ms'], r['window_forward_ms'],
             r['sec_forward_ms'] / r['window_forward_ms'], r['sec_backward_ms'],
             r['window_backward_ms'], r['sec_backward_ms'] / r['window_backward_ms'],
             r['sort_ms'], r['gathers_ms'], r['attention_ms']]
            for r in clustering['results']]
    parts.append(f"**Clustering cost**, secvit_s attention layers at 224×224, batch "
                 f"{clustering['batch']} (`python -m benchmarks.clustering`), "
                 f"{clustering['machine']}:\n\n"
                 + _table(['stage', 'tokens', 'clusters', 'SEC fwd ms', 'window fwd ms', 'ratio',
                           'SEC fwd+bwd ms', 'window fwd+bwd ms', 'ratio', 'sort ms',
                           'gathers ms', 'attention ms'], rows))
  cost = _load(os.path.join(results_dir, 'compiled_cost.json'))
  if cost:
    rows = [[r['variant'], r['mode'], r['flops_per_image'] / 1e9,
             r['matmul_conv_flops_per_image'] / 1e9, r['analytic_flops_per_image'] / 1e9,
             r['ratio_to_analytic'], r['temp_bytes_per_image'] / 2**20]
            for r in cost['results']]
    parts.append(f"**Compiled cost** (`python -m benchmarks.compiled_cost`), {cost['machine']}:"
                 '\n\n' + _table(['variant', 'mode', 'XLA GFLOP/img', 'matmul+conv GFLOP/img',
                                  'analytic GFLOP/img', 'XLA/analytic', 'temp MiB/img'], rows))
  tpu_rows = []
  for path in sorted(glob.glob(os.path.join(results_dir, 'tpu_*.json'))):
    r = _load(path)
    # Results from before the 'task' and 'input_size' fields are classification at 224×224.
    task = r.get('task', 'classification')
    model = r['model'] if task == 'classification' else f"{r['model']} {task}"
    size = '×'.join(str(x) for x in r.get('input_size', (224, 224)))
    tpu_rows.append([model, size, r['topology'], r['mesh'], r['remat'], r['global_batch'],
                     r['dtype'], r['per_chip_bytes'] / 2**30, r['hbm_bytes_per_chip'] / 2**30,
                     'yes' if r['fits'] else 'no',
                     r['flops_per_step'] / 1e12 if r['flops_per_step'] else '-',
                     ', '.join(f'{k} {v}' for k, v in sorted((r['collectives'] or {}).items()))
                     or '-'])
  if tpu_rows:
    parts.append('**TPU memory per chip**, compiled for the topology without a TPU '
                 '(`python -m benchmarks.tpu_compile`):\n\n'
                 + _table(['model', 'input', 'topology', 'mesh', 'remat', 'global batch', 'dtype',
                           'GiB/chip', 'HBM GiB', 'fits', 'TFLOP/step', 'collectives'], tpu_rows))
  return '\n\n'.join(parts)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--results', default='benchmarks/results',
                      help="directory of the benchmarks' JSON results")
  parser.add_argument('--readme', default='README.md',
                      help='file whose results section is rewritten')
  args = parser.parse_args()
  with open(args.readme) as f:
    text = f.read()
  if START not in text or END not in text:
    raise SystemExit(f'{args.readme} has no {START} ... {END} section')
  head, rest = text.split(START, 1)
  _, tail = rest.split(END, 1)
  with open(args.readme, 'w') as f:
    f.write(f'{head}{START}\n{render(args.results)}\n{END}{tail}')
  print(f'updated {args.readme}')


if __name__ == '__main__':
  main()
