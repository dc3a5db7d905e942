"""Where the train step's (or forward's) time goes: XLA's CPU profile, summed by part of the model.

    python -m benchmarks.profile_step --variant secvit_s [--mode train] [--batch 8] [--steps 3]
        [--json OUT]

Runs the step (`benchmarks.common.one_device_train_setup`, or the forward pass) under
`jax.profiler`, reads the trace of XLA's executed ops (thunks) and attributes each op's time to a
part of the model: by the Flax module in the op's name (e.g. `.../attn/qkv/...` -> dense matmuls,
`.../norm1/...` -> layer norms), else by the innermost function of the source stack XLA keeps for
it that names a part (e.g. `softmax_attention` -> attention, an optax file -> optimizer). Forward
and backward are told apart by JAX's `transpose(jvp(...))` in the op's name. A second table sums
the same time by the kind of XLA op (YNNPACK fusions, XLA dots, loop fusions, copies, custom
calls...).

Shares are of the summed op time, which the profiler inflates (about 1.5x on the CPU) and which
counts ops that ran concurrently twice; the step's own time is measured apart, without the
profiler (minimum of --steps calls). Nothing here is asserted: it measures and prints.
"""

from __future__ import annotations

from secvit_jax import hugepages
from secvit_jax import quiet

if __name__ == '__main__':  # First: before JAX and TensorFlow load (hugepages.py, quiet.py).
  hugepages.reexec_with_huge_pages()  # Measure as train.py runs.
  quiet.silence_startup_noise()

# pylint: disable=g-import-not-at-top,wrong-import-position,g-bad-import-order
import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import common
from secvit_jax import model as model_lib

DENSE = 'dense matmuls (1x1 convs)'
# Flax module names in an op's name (its module path) -> part; the innermost one decides.
MODULE_PARTS = {
    **dict.fromkeys(('qkv', 'out_proj', 'fc1', 'fc2', 'proj', 'head'), DENSE),
    **dict.fromkeys(('pos', 'lepe', 'dwconv'), 'depthwise convs'),
    **dict.fromkeys(('norm1', 'norm2'), 'layer norms'),
    **dict.fromkeys(('bn_0', 'bn_1', 'bn_2', 'bn_3', 'norm'), 'batch norms'),
    **dict.fromkeys(('conv_0', 'conv_1', 'conv_2', 'conv_3', 'reduction'),
                    'stem and downsample convs'),
}
# Functions of an op's source stack (innermost first) -> part, for ops outside those modules.
FUNCTION_PARTS = {
    'semantic_sort_order': 'clustering sort', 'argsort': 'clustering sort',
    'permute_tokens': 'token gathers', '_permute_tokens_bwd': 'token gathers',
    'inverse_permutation': 'token gathers',
    'softmax_attention': 'attention (softmax, batched dots)',
    'gelu': 'GELU', 'apply_rope': 'RoPE', 'drop_path': 'stochastic depth',
    'mix_batch': 'Mixup/CutMix', '_cutmix_keep_mask': 'Mixup/CutMix',
    'softmax_cross_entropy': 'loss',
    '<lambda>': 'EMA',  # train_step's tree_map over the EMA.
}
FILE_PARTS = (('/optax/', 'optimizer (AdamW), grad norm'),)
# Native kernels (custom-call targets of cpu_kernels.py) -> part, for ops outside those modules.
TARGET_PARTS = (('argsort', 'clustering sort'), ('gather_rows', 'token gathers'))
# Model ops no module or function above claims, by the module they are in.
REST_OF = (('/attn/', 'attention: head split/merge, scaling'), ('/ffn/', 'FFN: other'),
           ('/stem/', 'stem: other'), ('SecViT', 'residual adds, pooling, other'))
UNATTRIBUTED = 'train step: RNG (Mixup λ, drop path), metrics, other'


def parse_hlo(text: str) -> dict[str, dict[str, Any]]:
  """Instructions of an HLO module's text: name -> {'opcode', 'kind', 'op_name', 'stack'}.

  `stack` is the list of (file, function) of the instruction's source stack, innermost first,
  from the module's FileNames / FunctionNames / FileLocations / StackFrames tables.
  """
  tables: dict[str, dict[int, str]] = collections.defaultdict(dict)
  section = None
  for line in text.splitlines():
    if line in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
      section = line
      continue
    if section and re.match(r'^\d+ ', line):
      key, value = line.split(' ', 1)
      tables[section][int(key)] = value
    elif section and line.strip():
      section = None
  files = {k: v.strip('"') for k, v in tables['FileNames'].items()}
  functions = {k: v.strip('"') for k, v in tables['FunctionNames'].items()}
  locations = {}
  for key, value in tables['FileLocations'].items():
    fields = dict(re.findall(r'(\w+)=(\S+?)[ }]', value))
    locations[key] = (files.get(int(fields['file_name_id']), '?'),
                      functions.get(int(fields['function_name_id']), '?'))
  frames = {}
  for key, value in tables['StackFrames'].items():
    fields = dict(re.findall(r'(\w+)=(\d+)', value))
    frames[key] = (int(fields['file_location_id']), int(fields.get('parent_frame_id', 0)))

  def stack(frame_id: int) -> list[tuple[str, str]]:
    result, seen = [], set()
    while frame_id in frames and frame_id not in seen:
      seen.add(frame_id)
      location, parent = frames[frame_id]
      result.append(locations.get(location, ('?', '?')))
      frame_id = parent
    return result

  instructions = {}
  pattern = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = .*? ([a-z][a-z0-9\-]*)\((.*)$')
  for line in text.splitlines():
    match = pattern.match(line)
    if not match:
      continue
    name, opcode, rest = match.groups()
    kind = re.search(r'kind=(k\w+)', rest)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    frame = re.search(r'stack_frame_id=(\d+)', rest)
    target = re.search(r'custom_call_target="([^"]*)"', rest)
    instructions[name] = {
        'opcode': opcode, 'kind': kind.group(1) if kind else None,
        'ynn': '__ynn_fusion' in rest, 'target': target.group(1) if target else None,
        'op_name': op_name.group(1) if op_name else '',
        'stack': stack(int(frame.group(1))) if frame else []}
  return instructions


def part_of(instruction: dict[str, Any]) -> str:
  """The part of the model (or of the step) an instruction belongs to."""
  op_name = instruction['op_name']
  if 'SecViT' in op_name:
    for module in reversed(op_name.split('SecViT', 1)[1].split('/')):
      if module in MODULE_PARTS:
        return MODULE_PARTS[module]
  for fragment, part in TARGET_PARTS:
    if fragment in (instruction['target'] or ''):
      return part
  for file, function in instruction['stack']:
    short = function.split('.<locals>.')[-1]
    if short in FUNCTION_PARTS:
      return FUNCTION_PARTS[short]
    for fragment, part in FILE_PARTS:
      if fragment in file:
        return part
  for fragment, part in REST_OF:
    if fragment in op_name:
      return part
  return UNATTRIBUTED


def kind_of(instruction: dict[str, Any]) -> str:
  opcode = instruction['opcode']
  if instruction['ynn']:
    return 'YNNPACK fusion (dots, convs)'
  if opcode == 'custom-call':
    return 'native kernels (custom calls)'
  if opcode in ('dot', 'convolution'):
    return f'XLA {opcode}'
  if opcode in ('copy', 'transpose') or (opcode == 'fusion' and instruction['kind'] == 'kLoop'
                                          and 'copy' in instruction.get('name', '')):
    return 'copies and transposes'
  if opcode in ('gather', 'scatter', 'sort'):
    return f'XLA {opcode}'
  if opcode == 'fusion':
    return {'kInput': 'reduction fusions', 'kLoop': 'loop fusions (elementwise)',
            'kOutput': 'output fusions'}.get(instruction['kind'], 'other fusions')
  return 'other ops'


def direction_of(instruction: dict[str, Any]) -> str:
  return 'backward' if 'transpose(' in instruction['op_name'] else 'forward'


def read_trace(directory: str) -> list[dict[str, Any]]:
  paths = glob.glob(os.path.join(directory, 'plugins', 'profile', '*', '*.trace.json.gz'))
  if not paths:
    raise RuntimeError(f'jax.profiler wrote no trace under {directory}')
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    events = json.load(f)['traceEvents']
  return [e for e in events if e.get('ph') == 'X' and 'hlo_op' in e.get('args', {})]


def attribute(events: list[dict[str, Any]], instructions: dict[str, dict[str, Any]],
              steps: int) -> tuple[dict, dict, float]:
  """Per-step ms by (part, direction) and by op kind, and the summed op ms per step.

  Control-flow ops (while, conditional, call) are left out: their bodies' ops are counted.
  """
  by_part: dict[tuple[str, str], float] = collections.defaultdict(float)
  by_kind: dict[str, float] = collections.defaultdict(float)
  total = 0.0
  for event in events:
    instruction = instructions.get(event['args']['hlo_op'])
    if instruction is None or instruction['opcode'] in ('while', 'conditional', 'call'):
      continue
    instruction = {**instruction, 'name': event['args']['hlo_op']}
    ms = event['dur'] / 1e3 / steps
    by_part[(part_of(instruction), direction_of(instruction))] += ms
    by_kind[kind_of(instruction)] += ms
    total += ms
  return by_part, by_kind, total


def build(variant: str, mode: str, batch: int, size: int, dtype: str):
  """(compiled function, its arguments, whether it returns new arguments (train step))."""
  images = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
  if mode == 'forward':
    model = model_lib.create_model(variant, dtype=jnp.dtype(dtype))
    variables = jax.jit(lambda: model.init(  # 'rbg': an init program far quicker to compile.
          jax.random.key(0, impl='rbg'), images[:1], train=False))()
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    return forward.lower(variables, images).compile(), [variables, images], False
  _, setup = common.one_device_train_setup(variant, batch, size, dtype)
  compiled = setup.train_step.lower(setup.abstract_state, setup.abstract_batch).compile()
  arrays = {'image': images, 'label': jax.random.randint(jax.random.key(1), (batch,), 0, 1000)}
  return compiled, [setup.init_state(), arrays], True


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--variant', default='secvit_s', choices=sorted(model_lib.VARIANTS),
                      help='the model (default: secvit_s)')
  parser.add_argument('--mode', default='train', choices=['train', 'forward'],
                      help="the recipe's train step (default) or the forward pass")
  parser.add_argument('--batch', type=int, default=8, help='images per call (default: 8)')
  parser.add_argument('--size', type=int, default=224,
                      help='image height and width (default: 224)')
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'],
                      help='compute dtype (default: float32)')
  parser.add_argument('--steps', type=int, default=3, help='timed calls, then traced calls')
  common.add_output_flags(parser)
  args = parser.parse_args()
  print(common.machine_description())
  compiled, arguments, returns_state = build(args.variant, args.mode, args.batch, args.size,
                                             args.dtype)

  def call():
    out = compiled(*arguments)
    if returns_state:  # The train step donates its state.
      arguments[0] = out[0]
    jax.block_until_ready(out)

  call()
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  with tempfile.TemporaryDirectory() as directory:
    jax.profiler.start_trace(directory, create_perfetto_trace=False)
    start = time.perf_counter()
    for _ in range(args.steps):
      call()
    traced_s = (time.perf_counter() - start) / args.steps
    jax.profiler.stop_trace()
    events = read_trace(directory)
  instructions = parse_hlo(compiled.as_text())
  by_part, by_kind, total = attribute(events, instructions, args.steps)

  parts = sorted({part for part, _ in by_part},
                 key=lambda p: -(by_part[(p, 'forward')] + by_part[(p, 'backward')]))
  rows = [[part, by_part[(part, 'forward')], by_part[(part, 'backward')],
           by_part[(part, 'forward')] + by_part[(part, 'backward')],
           f"{100 * (by_part[(part, 'forward')] + by_part[(part, 'backward')]) / total:.1f}%"]
          for part in parts]
  step_ms = min(times) * 1e3
  print(f'\n{args.variant} {args.mode}, batch {args.batch}, {args.size}px, {args.dtype}: '
        f'{step_ms:.0f} ms per call (min of {args.steps}), {traced_s * 1e3:.0f} ms traced; '
        f'summed op time {total:.0f} ms per call\n')
  common.print_table(['part', 'forward ms', 'backward ms', 'total ms', 'share'], rows)
  print()
  kinds = sorted(by_kind, key=lambda k: -by_kind[k])
  common.print_table(['XLA op kind', 'ms', 'share'],
                     [[k, by_kind[k], f'{100 * by_kind[k] / total:.1f}%'] for k in kinds])
  common.write_json(args.json, {
      'variant': args.variant, 'mode': args.mode, 'batch': args.batch, 'size': args.size,
      'dtype': args.dtype, 'call_ms': step_ms, 'traced_call_ms': traced_s * 1e3,
      'summed_op_ms': total,
      'parts': [{'part': p, 'forward_ms': by_part[(p, 'forward')],
                 'backward_ms': by_part[(p, 'backward')]} for p in parts],
      'kinds': [{'kind': k, 'ms': by_kind[k]} for k in kinds]})


if __name__ == '__main__':
  main()
