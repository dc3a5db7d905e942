"""Where the train step's (or forward's) time goes: XLA's CPU profile, summed by part of the model.

    python -m benchmarks.profile_step --variant secvit_s [--mode train] [--batch 8] [--steps 3]
        [--json OUT]
    python -m benchmarks.profile_step --config configs/ade20k_upernet_secvit_s.py [--batch 2]
        [--size 512] [--json OUT]

Runs the step under `jax.profiler`: the classifier's (`benchmarks.common.one_device_train_setup`)
or its forward pass, or with --config any task's train step (`common.one_device_task_setup`) on a
synthetic batch valid in every field (`common.synthetic_train_batch`: scenes of digits, their
label maps, boxes and masks), the input resized by --size (the segmentation crop, the detection
canvas). It reads the trace of XLA's executed ops (thunks) and attributes each op's time to a
part of the model:
  - a backbone op (the classifier, or a dense model's 'backbone') by the innermost Flax module of
    its name that names a part (e.g. `.../attn/qkv/...` -> dense matmuls, `.../norm1/...` -> layer
    norms);
  - a dense model's other modules by their path (neck, decode head, RPN, RoI box head...), a
    resize or pooling inside them apart;
  - else by the innermost function (or file) of the op's source stack that names a part (e.g.
    `softmax_attention` -> attention, `detection/roi_align.py` -> RoIAlign, an optax file ->
    optimizer), the train step's EMA and the tasks' own loss code by the innermost frame alone.
Forward and backward are told apart by JAX's `transpose(jvp(...))` in the op's name (a remat'd
backbone's recomputation counts as backward). A second table sums the same time by the kind of
XLA op (YNNPACK fusions, XLA dots, loop fusions, copies, custom calls...).

Shares are of the summed op time, which the profiler inflates (1.5-2x the step's time on the
CPU here) and which counts ops that ran concurrently twice; the step's own time is measured apart, without the
profiler (minimum of --steps calls). Nothing here is asserted: it measures and prints.
"""

from __future__ import annotations

from secvit_jax import host_memory
from secvit_jax import quiet

if __name__ == '__main__':  # First: before JAX and TensorFlow load (host_memory.py, quiet.py).
  host_memory.reexec_with_memory_settings()  # Measure as train.py runs.
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
# Flax module names in a backbone op's module path -> part; the innermost one decides.
MODULE_PARTS = {
    **dict.fromkeys(('qkv', 'out_proj', 'fc1', 'fc2', 'proj', 'head'), DENSE),
    **dict.fromkeys(('pos', 'lepe', 'dwconv'), 'depthwise convs'),
    **dict.fromkeys(('norm1', 'norm2'), 'layer norms'),
    **dict.fromkeys(('bn_0', 'bn_1', 'bn_2', 'bn_3', 'norm'), 'batch norms'),
    **dict.fromkeys(('conv_0', 'conv_1', 'conv_2', 'conv_3', 'reduction'),
                    'stem and downsample convs'),
}
# Functions of an op's source stack (innermost first) -> part, for ops outside those modules.
LOSS = 'losses'
ASSIGNMENT = 'anchor and RoI assignment (IoU), RPN targets'
FUNCTION_PARTS = {
    'semantic_sort_order': 'clustering sort', 'argsort': 'clustering sort',
    'permute_tokens': 'token gathers', '_permute_tokens_bwd': 'token gathers',
    'inverse_permutation': 'token gathers',
    'softmax_attention': 'attention (softmax, batched dots)',
    'gelu': 'GELU', 'apply_rope': 'RoPE', 'drop_path': 'stochastic depth',
    'mix_batch': 'Mixup/CutMix', '_cutmix_keep_mask': 'Mixup/CutMix',
    'softmax_cross_entropy': LOSS, 'softmax_cross_entropy_with_integer_labels': LOSS,
    'sigmoid_binary_cross_entropy': LOSS, 'sigmoid_focal_loss': LOSS,
    'pixel_cross_entropy': LOSS, 'loss': LOSS,  # The detectors' (heads/*.py), not the tasks'.
    # Outside the heads (which HEAD_PARTS claim first): segmentation's logits, to the labels' size.
    'resize_bilinear': 'losses: logits upsampled to the labels',
    'rpn_targets': ASSIGNMENT,
}
# Functions that name a part only as the innermost frame (they are the callers of everything the
# step computes): the train step's tree_map over the EMA, the tasks' own loss code.
INNERMOST_PARTS = {
    'make_train_step.<locals>.train_step.<locals>.<lambda>': 'EMA',
    'SegmentationTask.loss': LOSS, 'DetectionTask.loss': LOSS,
}
# Source files (innermost first) -> part; None: its callers decide (shared helpers).
FILE_PARTS = (('/optax/losses/', LOSS), ('/optax/', 'optimizer (AdamW), grad norm'),
              ('/detection/roi_align.py', 'RoIAlign'),
              ('/detection/proposals.py', 'RPN proposals: top-k, decoding, NMS'),
              ('/detection/nms.py', 'RPN proposals: top-k, decoding, NMS'),
              ('/detection/sampling.py', 'anchor and RoI sampling'),
              ('/detection/assign.py', ASSIGNMENT), ('/detection/anchors.py', ASSIGNMENT),
              ('/detection/masks.py', 'mask targets (resampled crops)'),
              ('/detection/boxes.py', None))
# Native kernels (custom-call targets of cpu_kernels.py) -> part, for ops outside those modules.
TARGET_PARTS = (('argsort', 'clustering sort'), ('sort_scores', 'clustering sort'),
                ('gather_rows', 'token gathers'),
                ('cluster_attention', 'attention (fused kernel: RoPE, gathers, softmax, dots)'))
# Backbone ops no module or function above claims, by the module they are in.
REST_OF = (('attn', 'attention: head split/merge, scaling'), ('ffn', 'FFN: other'),
           ('stem', 'stem: other'))
BACKBONE_REST = 'residual adds, pooling, other'
# A dense model's modules besides its backbone (module path prefixes, the first match decides) ->
# part; an op of one in a function of HEAD_FUNCTIONS is that function's share of the part.
HEAD_PARTS = (('neck/', 'FPN neck'), ('decode_head/psp/', 'decode head: pyramid pooling'),
              ('decode_head/', 'decode head'), ('auxiliary_head/', 'auxiliary FCN head'),
              ('head/', 'RetinaNet head (class and box subnets)'), ('rpn_head/', 'RPN head'),
              ('box_head/', 'RoI box head'), ('mask_head/', 'mask head'))
HEAD_FUNCTIONS = {'resize_bilinear': 'upsampling', 'resize_nearest': 'upsampling',
                  'adaptive_avg_pool': 'pooling'}
UNATTRIBUTED = 'train step: RNG, metrics, other'


def parse_hlo(text: str) -> dict[str, dict[str, Any]]:
  """Instructions of an HLO module's text: name -> {'opcode', 'kind', 'op_name', 'stack', 'calls',
  'operands', ...}.

  `stack` is the list of (file, function) of the instruction's source stack, innermost first,
  from the module's FileNames / FileLocations / FunctionNames / StackFrames tables; `calls` the
  computation a fusion calls. An instruction XLA left without an op name and stack gets those of
  `_metadata_donor`.
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
    # The printed parent is one more than the parent's key (0 and 1: none).
    frames[key] = (int(fields['file_location_id']), int(fields.get('parent_frame_id', 0)) - 1)

  def stack(frame_id: int) -> list[tuple[str, str]]:
    result, seen = [], set()
    while frame_id in frames and frame_id not in seen:
      seen.add(frame_id)
      location, parent = frames[frame_id]
      result.append(locations.get(location, ('?', '?')))
      frame_id = parent
    return result

  instructions = {}
  computations: dict[str, list[str]] = collections.defaultdict(list)  # Name -> instructions.
  computation = None
  pattern = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = .*? ([a-z][a-z0-9\-]*)\((.*)$')
  for line in text.splitlines():
    header = re.match(r'^(?:ENTRY )?%([\w.\-]+) .*\{$', line)
    if header:
      computation = header.group(1)
      continue
    match = pattern.match(line)
    if not match:
      continue
    name, opcode, rest = match.groups()
    kind = re.search(r'kind=(k\w+)', rest)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    frame = re.search(r'stack_frame_id=(\d+)', rest)
    target = re.search(r'custom_call_target="([^"]*)"', rest)
    calls = re.search(r'calls=%([\w.\-]+)', rest)
    computations[computation].append(name)
    instructions[name] = {
        'opcode': opcode, 'kind': kind.group(1) if kind else None,
        'ynn': '__ynn_fusion' in rest, 'target': target.group(1) if target else None,
        'op_name': op_name.group(1) if op_name else '',
        'stack': stack(int(frame.group(1))) if frame else [],
        'calls': calls.group(1) if calls else None,
        'operands': re.findall(r'%([\w.\-]+)', rest.split(')', 1)[0])}
  for instruction in instructions.values():
    if not instruction['op_name']:
      donor = _metadata_donor(instruction, instructions, computations)
      instruction.update(op_name=donor['op_name'], stack=donor['stack'])
  return instructions


def _metadata_donor(instruction: dict[str, Any], instructions: dict[str, dict[str, Any]],
                    computations: dict[str, list[str]], depth: int = 3) -> dict[str, Any]:
  """The instruction whose op name and stack stand for `instruction`'s, which XLA dropped (e.g. a
  weight gradient's convolution, rewritten after fusion): an instruction of its fused computation
  that has them, else an operand's donor, a backward one first (a weight gradient's operands are
  the forward input and the output's cotangent); `instruction` itself when none has them."""
  if instruction['op_name'] or depth == 0:
    return instruction
  inner = [instructions[name] for name in computations.get(instruction['calls'], ())
           if instructions[name]['op_name']]
  if inner:
    return inner[-1]
  donors = [_metadata_donor(instructions[name], instructions, computations, depth - 1)
            for name in instruction['operands'] if name in instructions]
  donors = [donor for donor in donors if donor['op_name']]
  donors.sort(key=lambda donor: direction_of(donor) != 'backward')
  return donors[0] if donors else instruction


def module_path(op_name: str) -> tuple[str, list[str]]:
  """The model (its Flax class, '' outside it) and the module path of an op inside it, from its
  name: 'jit(train_step)/transpose(jvp(MaskRCNN))/box_head/fc_0/dot_general' -> ('MaskRCNN',
  ['box_head', 'fc_0', 'dot_general'])."""
  match = re.search(r'jvp\((\w+)\)\)?/(.*)', op_name)
  return (match.group(1), match.group(2).split('/')) if match else ('', [])


def part_of(instruction: dict[str, Any]) -> str:
  """The part of the model (or of the step) an instruction belongs to."""
  model, path = module_path(instruction['op_name'])
  # The classifier is the backbone with its head; a dense model holds it as 'backbone'.
  backbone = path if model == 'SecViT' else path[1:] if path[:1] == ['backbone'] else None
  for module in reversed(backbone or []):
    if module in MODULE_PARTS:
      return MODULE_PARTS[module]
  for fragment, part in TARGET_PARTS:
    if fragment in (instruction['target'] or ''):
      return part
  stack = instruction['stack']
  if stack and stack[0][1] in INNERMOST_PARTS:
    return INNERMOST_PARTS[stack[0][1]]
  functions = [function.split('.<locals>.')[-1] for _, function in stack]
  where = '/'.join(path) + '/'
  for prefix, part in HEAD_PARTS:
    if backbone is None and where.startswith(prefix):
      function = next((f for f in functions if f in HEAD_FUNCTIONS), None)
      return f'{part}: {HEAD_FUNCTIONS[function]}' if function else part
  for (file, _), function in zip(stack, functions):
    if function in FUNCTION_PARTS:
      return FUNCTION_PARTS[function]
    part = next((part for fragment, part in FILE_PARTS if fragment in file), False)
    if part is not False and part is not None:
      return part
  if backbone is not None:
    return next((part for module, part in REST_OF if module in backbone), BACKBONE_REST)
  if model and model != 'SecViT':
    return f'{model}: other (concatenations, gathers)'
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


def build(args: argparse.Namespace):
  """(compiled function, its arguments, whether it returns new arguments (train step), what ran:
  the JSON's description of the step)."""
  if args.config:
    config = common.load_config(args.config)
    recipe_input = list(common.input_size(config))
    config.dtype = args.dtype
    setup = common.one_device_task_setup(config, args.batch, args.size)
    compiled = setup.train_step.lower(setup.abstract_state, setup.abstract_batch).compile()
    batch = common.synthetic_train_batch(config, setup.abstract_batch)
    name = os.path.splitext(os.path.basename(args.config))[0]
    return compiled, [setup.init_state(), batch], True, {
        'config': name, 'task': config.task, 'variant': config.model.name,
        'input': list(setup.abstract_batch['image'].shape[1:3]), 'recipe_input': recipe_input,
        'remat': bool(config.model.remat)}
  described = {'variant': args.variant, 'size': args.size}
  images = jax.random.normal(jax.random.key(0), (args.batch, args.size, args.size, 3))
  if args.mode == 'forward':
    model = model_lib.create_model(args.variant, dtype=jnp.dtype(args.dtype))
    variables = jax.jit(lambda: model.init(  # 'rbg': an init program far quicker to compile.
          jax.random.key(0, impl='rbg'), images[:1], train=False))()
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    return forward.lower(variables, images).compile(), [variables, images], False, described
  _, setup = common.one_device_train_setup(args.variant, args.batch, args.size, args.dtype)
  compiled = setup.train_step.lower(setup.abstract_state, setup.abstract_batch).compile()
  arrays = {'image': images,
            'label': jax.random.randint(jax.random.key(1), (args.batch,), 0, 1000)}
  return compiled, [setup.init_state(), arrays], True, described


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--variant', default='secvit_s', choices=sorted(model_lib.VARIANTS),
                      help="the classifier, in its ImageNet recipe's step (default: secvit_s)")
  parser.add_argument('--config', metavar='configs/NAME.py',
                      help="instead, any task's training config: its train step, as train.py "
                           'builds it, on synthetic batches (benchmarks.common.'
                           'synthetic_train_batch); e.g. configs/ade20k_upernet_secvit_s.py')
  parser.add_argument('--mode', default='train', choices=['train', 'forward'],
                      help="the recipe's train step (default) or the forward pass (--variant "
                           'only)')
  parser.add_argument('--batch', type=int,
                      help='examples per call (default: 8 with --variant, 2 with --config)')
  parser.add_argument('--size', type=int,
                      help='input height and width (default: 224 with --variant; with --config '
                           "the recipe's: the segmentation crop, the detection canvas)")
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'],
                      help='compute dtype (default: float32, also with --config)')
  parser.add_argument('--steps', type=int, default=3, help='timed calls, then traced calls')
  common.add_output_flags(parser)
  args = parser.parse_args()
  if args.config and args.mode != 'train':
    parser.error('--config profiles the train step only (--mode train)')
  if args.batch is None:
    args.batch = 2 if args.config else 8
  if args.size is None and not args.config:
    args.size = 224
  print(common.machine_description())
  compiled, arguments, returns_state, described = build(args)

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
  if args.config:
    what = f"{described['config']}, batch {args.batch}, {'×'.join(map(str, described['input']))}"
  else:
    what = f'{args.variant} {args.mode}, batch {args.batch}, {args.size}px'
  print(f'\n{what}, {args.dtype}: '
        f'{step_ms:.0f} ms per call (min of {args.steps}), {traced_s * 1e3:.0f} ms traced; '
        f'summed op time {total:.0f} ms per call\n')
  common.print_table(['part', 'forward ms', 'backward ms', 'total ms', 'share'], rows)
  print()
  kinds = sorted(by_kind, key=lambda k: -by_kind[k])
  common.print_table(['XLA op kind', 'ms', 'share'],
                     [[k, by_kind[k], f'{100 * by_kind[k] / total:.1f}%'] for k in kinds])
  common.write_json(args.json, {
      **described, 'mode': args.mode, 'batch': args.batch, 'dtype': args.dtype, 'call_ms': step_ms, 'traced_call_ms': traced_s * 1e3,
      'summed_op_ms': total,
      'parts': [{'part': p, 'forward_ms': by_part[(p, 'forward')],
                 'backward_ms': by_part[(p, 'backward')]} for p in parts],
      'kinds': [{'kind': k, 'ms': by_kind[k]} for k in kinds]})


if __name__ == '__main__':
  main()
