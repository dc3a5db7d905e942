"""Writes the README's results section from the JSON files the benchmark scripts wrote.

    python -m benchmarks.readme_table [--results benchmarks/results] [--readme README.md]

Reads throughput.json (benchmarks/throughput.py, the release side by side), step_parts.json
(benchmarks/step_parts.py), profile_*.json
(benchmarks/profile_step.py: a classifier's alone, the dense tasks' side by side),
depthwise.json, clustering.json, compiled_cost.json, backbone.json, export.json,
input_pipeline.json and tpu_*.json (any that exist) and replaces the text between the README's
`<!-- results:start -->` and `<!-- results:end -->`.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

from benchmarks import attention
from benchmarks import backbone
from benchmarks import export
from benchmarks import input_pipeline
from benchmarks import step_parts
from benchmarks.common import markdown_table as _table
from secvit_jax import host_memory

START, END = '<!-- results:start -->', '<!-- results:end -->'


def _load(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def throughput_section(throughput: dict) -> str:
  """The side-by-side table of benchmarks/throughput.py's JSON, with the command that made it; with
  a baseline side, its img/s as 'before' (named by its revision) beside this project's."""
  sides = throughput['sides']
  baseline = sides.get('baseline')
  rows = []
  for r in throughput['results']:
    release = r.get('release')
    before = [r['baseline']['images_per_s'], f"{r['ratio_baseline']:.2f}×"] if baseline else []
    rows.append([r['variant'], r['mode'], r['batch'], r['size'], r['dtype'],
                 r['project']['images_per_s'], *before,
                 release['images_per_s'] if release else '-',
                 f"**{r['ratio_release']:.2f}×**" if release else '-'])
  project, release = sides['project'], sides.get('release', {})
  cached = lambda side: any(map(host_memory.is_buffer_cache,
                                host_memory.preloaded_paths(side.get('LD_PRELOAD', ''))))
  setting = (f"{throughput['processor']}, {project['threads']} threads per side, "
             f"`GLIBC_TUNABLES={project['GLIBC_TUNABLES'] or '(unset)'}`, "
             f"buffer cache {'preloaded' if cached(project) else 'off'}, {project['scheduler']}, "
             f"{project['framework']} against {release.get('framework', '-')}, "
             f"minimum of {throughput['repeats']} alternating turns")
  before = []
  if baseline:
    setting += (f"; 'before' is this project at {baseline.get('revision') or baseline['package']}"
                f"{'' if cached(baseline) else ' without the buffer cache'}, "
                f"'img/s' at {project.get('revision') or project['package']}")
    before = ['before img/s', 'vs before']
  return (f"**Throughput against the release, side by side** (`{throughput['command']}`; "
          f"{setting}):\n\n"
          + _table(['variant', 'mode', 'batch', 'size', 'dtype', 'img/s', *before,
                    'release img/s', 'vs release'], rows))


def step_parts_section(results: dict) -> str:
  """The train step's wall-clock parts (benchmarks/step_parts.py's JSON)."""
  return (f"**The train step in wall-clock parts** (batch {results['batch']}, float32, ms, "
          f"minimum of {results['rounds']} turns; `python -m benchmarks.step_parts`: the "
          'backward pass is loss and grad - train loss, the update (AdamW, EMA, metrics) train '
          f"step - loss and grad), {results['machine']}:\n\n"
          + _table(step_parts.HEADERS, step_parts.table_rows(results['results'])))


def profile_section(profile: dict) -> str:
  """Where a step's time goes, by part of the model (benchmarks/profile_step.py's JSON)."""
  total = profile['summed_op_ms']
  rows = [[p['part'], p['forward_ms'], p['backward_ms'],
           f"{100 * (p['forward_ms'] + p['backward_ms']) / total:.1f}%"]
          for p in profile['parts']]
  return (f"**Where the {profile['variant']} {profile['mode']} step's time goes** (batch "
          f"{profile['batch']}, {profile['dtype']}; `python -m benchmarks.profile_step --variant "
          f"{profile['variant']} --mode {profile['mode']}`, XLA's CPU profile; "
          f"{profile['call_ms']:.0f} ms per call, shares of the summed op time), "
          f"{profile['machine']}:\n\n"
          + _table(['part', 'forward ms', 'backward ms', 'share'], rows))


def input_pipeline_section(pipeline: dict) -> str:
  """Each recipe's host preprocessing against a v5e-8 host's demand (benchmarks/input_pipeline.py's
  JSON)."""
  return (f"**Host input pipelines against a TPU v5e-8 host** (`{pipeline['command']}`): each "
          "recipe's per-image training transform on one core (images per CPU-second, synthetic "
          "datasets of the real sizes held in memory), against what the host's "
          f"{pipeline['chips_per_host']} chips consume at {pipeline['utilisation']:.0%} of "
          f"{pipeline['peak_bf16_flop_per_s'] / 1e12:.0f} TFLOP/s bf16 with the train step's "
          'compiled FLOPs per image (the TPU table below), and the host cores that takes, beside '
          "the host's vCPUs (ct5lp-hightpu-8t; a vCPU is a hardware thread); "
          f"{pipeline['machine']}:\n\n"
          + _table(input_pipeline.RECIPE_HEADERS,
                   input_pipeline.recipe_table_rows(pipeline['recipes'])))


def dense_profiles_section(profiles: list[dict]) -> str:
  """The dense tasks' train steps side by side, by part (benchmarks/profile_step.py --config's
  JSONs): each part's forward + backward ms per call and its share of the step's summed op time;
  a part a task lacks is '-'."""
  totals = [{p['part']: p['forward_ms'] + p['backward_ms'] for p in profile['parts']}
            for profile in profiles]
  parts = sorted({part for total in totals for part in total},
                 key=lambda part: -max(t.get(part, 0.0) / p['summed_op_ms']
                                       for t, p in zip(totals, profiles)))
  rows = [[part] + [f"{t[part]:,.0f} ({100 * t[part] / p['summed_op_ms']:.1f}%)" if part in t
                    else '-' for t, p in zip(totals, profiles)] for part in parts]
  rows.append(['**step, without the profiler**']
              + [f"**{p['call_ms']:,.0f}**" for p in profiles])
  runs = []
  for p in profiles:
    size = '×'.join(map(str, p['input']))
    recipe = '×'.join(map(str, p['recipe_input']))
    command = (f"python -m benchmarks.profile_step --config configs/{p['config']}.py "
               f"--batch {p['batch']} --size {p['input'][0]}"
               + ('' if p['dtype'] == 'float32' else f" --dtype {p['dtype']}"))
    which = "the recipe's" if size == recipe else f'recipe: {recipe}'
    runs.append(f"- {p['config']}: batch {p['batch']}, {size} input ({which}), {p['dtype']}"
                f"{', remat backbone' if p['remat'] else ''}, {p['call_ms']:,.0f} ms per call: "
                f'`{command}`')
  return ("**Where the dense tasks' train steps' time goes**, ms per call (forward + backward) "
          "and share of the summed op time, XLA's CPU profile on synthetic batches of digit "
          f"scenes, {profiles[0]['machine']}:\n\n" + '\n'.join(runs) + '\n\n'
          + _table(['part'] + [p['config'] for p in profiles], rows))


def render(results_dir: str) -> str:
  parts = []
  throughput = _load(os.path.join(results_dir, 'throughput.json'))
  if throughput:
    parts.append(throughput_section(throughput))
  parts_of_step = _load(os.path.join(results_dir, 'step_parts.json'))
  if parts_of_step:
    parts.append(step_parts_section(parts_of_step))
  attention_results = _load(os.path.join(results_dir, 'attention.json'))
  if attention_results:
    parts.append(f"**The attention from the qkv rows, XLA against the fused CPU kernel** "
                 f"(secvit_t and secvit_s share these stages; batch {attention_results['batch']}, "
                 f"float32, ms, medians; `python -m benchmarks.attention`), "
                 f"{attention_results['machine']}:\n\n"
                 + _table(attention.HEADERS, attention.table_rows(attention_results['results'])))
  dense = []
  for path in sorted(glob.glob(os.path.join(results_dir, 'profile_*.json'))):
    profile = _load(path)
    if 'config' in profile:
      dense.append(profile)
    else:
      parts.append(profile_section(profile))
  if dense:
    parts.append(dense_profiles_section(dense))
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
  dense = _load(os.path.join(results_dir, 'backbone.json'))
  if dense:
    parts.append(f"**Backbone at dense-prediction sizes**, {dense['variant']}, CPU batch "
                 f"{dense['batch']} float32 (minimum of {dense['runs']} runs), TPU "
                 f"{dense['topology']} global batch {dense['tpu_batch']} bfloat16, "
                 f"forward+backward (`python -m benchmarks.backbone`), {dense['machine']}:\n\n"
                 + _table(backbone.DENSE_HEADERS, backbone.dense_rows(dense)))
    if dense['padding']:
      parts.append(f"**Cost of padding**, {dense['variant']} backbone, CPU batch "
                   f"{dense['padding_batch']}, fixed counts, per stage-0 token "
                   '(`python -m benchmarks.backbone`):\n\n'
                   + _table(backbone.PADDING_HEADERS, backbone.padding_rows(dense)))
  served = _load(os.path.join(results_dir, 'export.json'))
  if served:
    parts.append(f"**Served classifiers**, 224×224 float32, ms per batch and images per second, "
                 f"JAX jit against the exported SavedModel (TensorFlow) and ONNX file "
                 f"(onnxruntime), side by side in one process (`{served['command']}`, medians "
                 f"of {served['runs']} calls), {served['machine']}:\n\n"
                 + _table(export.HEADERS, export.table_rows(served['results'])))
  pipeline = _load(os.path.join(results_dir, 'input_pipeline.json'))
  if pipeline and pipeline.get('recipes'):
    parts.append(input_pipeline_section(pipeline))
  tpu_rows = []
  for path in sorted(glob.glob(os.path.join(results_dir, 'tpu_*.json'))):
    r = _load(path)
    # Results from before 'head' and 'input' were recorded are classifiers at 224×224.
    model = ' + '.join(filter(None, (r['model'], r.get('head'))))
    tpu_rows.append([model, '×'.join(map(str, r.get('input', (224, 224)))), r['topology'],
                     r['mesh'], r['remat'], r['global_batch'], r['dtype'],
                     r['per_chip_bytes'] / 2**30, r['hbm_bytes_per_chip'] / 2**30,
                     'yes' if r['fits'] else 'no',
                     r['flops_per_step'] / 1e12 if r['flops_per_step'] else '-',
                     r['flops_per_step'] / r['global_batch'] / 1e9 if r['flops_per_step'] else '-',
                     ', '.join(f'{k} {v}' for k, v in sorted((r['collectives'] or {}).items()))
                     or '-'])
  if tpu_rows:
    parts.append('**TPU memory per chip**, compiled for the topology without a TPU '
                 '(`python -m benchmarks.tpu_compile`):\n\n'
                 + _table(['model', 'input', 'topology', 'mesh', 'remat', 'global batch', 'dtype',
                           'GiB/chip', 'HBM GiB', 'fits', 'TFLOP/step', 'GFLOP/img',
                           'collectives'], tpu_rows))
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
