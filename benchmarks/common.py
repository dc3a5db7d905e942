"""What every benchmark script shares: timing of compiled functions, tables, JSON results.

Timings are medians over several calls after compilation; compile time is reported apart. Nothing
here asserts a speed: the scripts measure and print.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np


# The sizes of each recipe's dataset (`config.dataset`), for building its train step without
# reading data: classes (the model's heads) and training examples (the schedule's epochs).
RECIPE_DATASETS = {
    'imagenet2012': (1000, 1_281_167, 50_000),  # ImageNet-1k.
    'ade20k': (150, 20_210, 2_000),  # ADE20K's SceneParsing benchmark.
    'coco': (80, 117_266, 5_000),  # COCO 2017; training: the images with a box.
}


def load_config(path: str):
  """The `get_config()` of a config file of this checkout's `configs/` (e.g.
  'configs/ade20k_upernet_secvit_s.py'), imported as `configs.<name>`, so that the file's own
  `from configs import ...` works."""
  directory, name = os.path.split(os.path.abspath(path))
  if os.path.basename(directory) != 'configs' or not name.endswith('.py'):
    raise ValueError(f'{path} is not a configs/<name>.py file')
  if not os.path.isfile(path):
    raise ValueError(f'no such file: {os.path.abspath(path)}')
  return importlib.import_module(f'configs.{name[:-3]}').get_config()


def input_size(config) -> tuple[int, int]:
  """`config`'s training input (height, width): classification's `image_size`, segmentation's
  crop (`input.crop_size`), detection's canvas (`input.canvas_size`)."""
  if config.task == 'classification':
    return config.image_size, config.image_size
  if config.task == 'segmentation':
    return tuple(config.input.crop_size)
  if config.task == 'detection':
    return tuple(config.input.canvas_size)
  raise ValueError(f'no input size of task {config.task!r} is known here')


def set_input_size(config, size: int) -> None:
  """Makes `config`'s training input (`input_size`) `size`×`size`."""
  input_size(config)  # Checks the task.
  if config.task == 'classification':
    config.image_size = size
  elif config.task == 'segmentation':
    config.input.crop_size = (size, size)
  else:
    config.input.canvas_size = (size, size)


def one_device_task_setup(config, batch: int, size: int | None = None,
                          device: jax.Device | None = None):
  """The train step of any task's `config` (its task from `secvit_jax.tasks.TASKS`) as
  `secvit_jax.train_lib` builds it for one device (default: the first), at `batch` examples and
  an input of `size`×`size` (`set_input_size`; None: the config's). The dataset's classes and
  size are its recipe's (`RECIPE_DATASETS`); nothing is read. Changes `config` accordingly and
  returns the `train_lib.TrainSetup` (jitted steps that donate the state, abstract state and
  batch; no arrays yet).

  The one place that builds the benchmarks' train steps: adapt it here when train_lib changes.
  """
  # Imported here: train_lib pulls in TensorFlow, which the per-layer scripts do not need.
  from secvit_jax import sharding  # pylint: disable=g-import-not-at-top
  from secvit_jax import tasks  # pylint: disable=g-import-not-at-top
  from secvit_jax import train_lib  # pylint: disable=g-import-not-at-top
  from secvit_jax.data import sources  # pylint: disable=g-import-not-at-top
  if config.dataset not in RECIPE_DATASETS:
    raise ValueError(f'config.dataset={config.dataset!r}: its size is not known here; known: '
                     f'{", ".join(RECIPE_DATASETS)}')
  config.batch_size = batch
  if size is not None:
    set_input_size(config, size)
  config.mesh.data, config.mesh.fsdp = 1, 1
  classes, train_examples, eval_examples = RECIPE_DATASETS[config.dataset]
  info = sources.DatasetInfo(num_classes=classes, num_train_examples=train_examples,
                             num_eval_examples=eval_examples)
  mesh = sharding.create_mesh(config.mesh, [device or jax.devices()[0]])
  task = tasks.get_task_class(config.task)(config, info)
  return train_lib.create_train_setup(config, mesh, task)


def one_device_train_setup(variant: str, batch: int, size: int, dtype: str,
                           device: jax.Device | None = None,
                           model_overrides: dict[str, Any] | None = None):
  """The train step every classification benchmark measures: the variant's ImageNet recipe (the
  classification task's Mixup/CutMix, forward and backward with stochastic depth, AdamW with its
  schedule and weight-decay mask, EMA) at this batch, image size and compute dtype, on one device
  (`one_device_task_setup`), with `model_overrides` as fields of `config.model` (e.g.
  {'attention_impl': 'cudnn'}). Returns (its config, its `train_lib.TrainSetup`).
  """
  config = importlib.import_module(f'configs.{variant}').get_config()
  config.dtype = dtype
  for field, value in (model_overrides or {}).items():
    config.model[field] = value
  return config, one_device_task_setup(config, batch, size, device)


# Digits per synthetic scene (COCO averages about 7 objects an image) and their sides, as fractions
# of the image's shorter side.
SCENE_DIGITS = (4, 12)
SCENE_DIGIT_SIDES = (0.05, 0.3)


def synthetic_train_batch(config, abstract_batch: dict[str, jax.ShapeDtypeStruct],
                          seed: int = 0) -> dict[str, np.ndarray]:
  """A training batch of `config`'s task with the shapes and dtypes of `abstract_batch` (e.g. a
  `TrainSetup`'s), every field valid as the task's data would make it, from scenes of handwritten
  digits (`secvit_jax.data.digit_scenes.render_scene`, example i being scene i of `seed`):

    image          the scene, ImageNet-normalized, at the top left of the input (B, H, W, 3),
                   zeros around it; segmentation and classification scenes fill the input, a
                   detection scene is a landscape (even i) or portrait (odd i) image of COCO's
                   1333×800 shape whose longer side fills the canvas
    label          classification: int32 (B,) classes; segmentation: int32 (B, H, W) the ink's
                   digit through the dataset's label format (ADE20K: the background, label
                   value 0, is ignored; digit d is class d)
    image_size     int32 (B, 2), each scene's (height, width) on the canvas
    boxes, labels, crowd, box_mask   each digit's ink box (x0, y0, x1, y1) and digit, padded; no
                   crowds
    gt_mask_crops  uint8 (B, G, C, C), each digit's ink over its box
                   (`detection.masks.crop_masks_to_boxes`)

  Raises:
    ValueError: for a field not listed here.
  """
  # Imported here: the data modules pull in TensorFlow.
  from secvit_jax.data import digit_scenes  # pylint: disable=g-import-not-at-top
  from secvit_jax.data import ops  # pylint: disable=g-import-not-at-top
  from secvit_jax.detection import masks as masks_lib  # pylint: disable=g-import-not-at-top
  unknown = sorted(set(abstract_batch) - {'image', 'label', 'image_size', 'boxes', 'labels',
                                          'crowd', 'box_mask', 'gt_mask_crops'})
  if unknown:
    raise ValueError(f'no synthetic values of the batch fields {unknown} are known here')
  batch_size, height, width, _ = abstract_batch['image'].shape
  arrays = {name: np.zeros(spec.shape, spec.dtype) for name, spec in abstract_batch.items()}
  for index in range(batch_size):
    scene_height, scene_width = height, width
    if config.task == 'detection':
      long_side, short_side = config.input.max_size
      longest = max(height, width)
      scene_height, scene_width = min(height, round(longest * short_side / long_side)), longest
      if index % 2:
        scene_height, scene_width = min(height, scene_width), min(width, scene_height)
    shorter = min(scene_height, scene_width)
    scene = digit_scenes.render_scene(
        seed, 'train', index, height=scene_height, width=scene_width, digits=SCENE_DIGITS,
        sizes=tuple(max(8, round(f * shorter)) for f in SCENE_DIGIT_SIDES))
    mean, std = np.asarray(ops.IMAGENET_MEAN), np.asarray(ops.IMAGENET_STD)
    arrays['image'][index, :scene_height, :scene_width] = (scene.image / 255.0 - mean) / std
    if 'label' in arrays and arrays['label'].ndim == 1:
      arrays['label'][index] = scene.classes[0] if len(scene.classes) else 0
    elif 'label' in arrays:
      arrays['label'][index] = segmentation_labels(config, scene.labels)
    if 'image_size' in arrays:
      arrays['image_size'][index] = scene_height, scene_width
    count = len(scene.classes)
    for name, values in (('boxes', scene.boxes), ('labels', scene.classes),
                         ('box_mask', np.ones(count, bool))):
      if name in arrays:
        arrays[name][index, :count] = values
    if 'gt_mask_crops' in arrays:
      arrays['gt_mask_crops'][index, :count] = masks_lib.crop_masks_to_boxes(
          scene.masks, scene.boxes, arrays['gt_mask_crops'].shape[-1])
  return arrays


def segmentation_labels(config, scene_labels: np.ndarray) -> np.ndarray:
  """A digit scene's label map (0 background, 1 + d digit d) read as `config.dataset`'s label
  PNG values (`data.segmentation.label_format`): int32 classes or the ignore value."""
  from secvit_jax.data import segmentation  # pylint: disable=g-import-not-at-top
  label_format = segmentation.label_format(config)
  values = scene_labels.astype(np.int32)
  if label_format.reduce_zero_label:
    return np.where(values == 0, label_format.ignore_index, values - 1)
  return values


@dataclasses.dataclass
class Timing:
  compile_s: float
  median_s: float
  runs: int


def time_compiled(fn: Callable[..., Any], *args: Any, runs: int = 5, warmup: int = 1) -> Timing:
  """Compiles `jax.jit(fn)` for `args`, then times `runs` calls (after `warmup` untimed calls)."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  median_s = median_call_seconds(lambda: jax.block_until_ready(compiled(*args)), runs, warmup)
  return Timing(compile_s, median_s, runs)


def median_call_seconds(call: Callable[[], Any], runs: int = 5, warmup: int = 1) -> float:
  """The median time of `runs` calls of `call` (which must return when its work is done), after
  `warmup` untimed calls."""
  for _ in range(warmup):
    call()
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def machine_description() -> str:
  """A one-line description of where the measurement ran."""
  device = jax.devices()[0]
  kind = getattr(device, 'device_kind', device.platform)
  return (f'{kind} ({jax.device_count()} device(s)), {os.cpu_count()} host cores, '
          f'{platform.machine()}, jax {jax.__version__}')


def compiled_analyses(compiled) -> tuple[float, dict[str, int]]:
  """XLA's FLOP count and memory bytes (argument, output, alias, temp) of a compiled program."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX returned one dict per program.
    cost = cost[0]
  memory = compiled.memory_analysis()
  return float(cost['flops']), {
      'argument_bytes': int(memory.argument_size_in_bytes),
      'output_bytes': int(memory.output_size_in_bytes),
      'alias_bytes': int(memory.alias_size_in_bytes),
      'temp_bytes': int(memory.temp_size_in_bytes),
  }


def add_output_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--json', metavar='PATH', help='also write the results as JSON here')


def parse_layer_benchmark_args(doc: str) -> argparse.Namespace:
  """Flags of the per-layer scripts (--batch, --runs, --json); prints where they run."""
  parser = argparse.ArgumentParser(description=doc.split('\n\n')[0])
  parser.add_argument('--batch', type=int, default=8, help='images per batch')
  parser.add_argument('--runs', type=int, default=5, help='timed calls per figure (median)')
  add_output_flags(parser)
  args = parser.parse_args()
  print(machine_description())
  return args


def format_cell(value: Any) -> str:
  """A table cell: floats to 3 significant digits, whole above 1,000 (2,830, not 2.83e+03)."""
  if not isinstance(value, float):
    return str(value)
  return f'{value:,.0f}' if abs(value) >= 1000 else f'{value:.3g}'


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A Markdown table (so the output can go into the README as it is)."""
  lines = ['| ' + ' | '.join(headers) + ' |', '|' + '|'.join('---' for _ in headers) + '|']
  lines += ['| ' + ' | '.join(format_cell(v) for v in row) + ' |' for row in rows]
  return '\n'.join(lines)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
  """Prints a Markdown table."""
  print(markdown_table(headers, rows))


def write_json(path: str | None, payload: dict[str, Any]) -> None:
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
      json.dump({'machine': machine_description(), **payload}, f, indent=2)
    print(f'wrote {path}')
