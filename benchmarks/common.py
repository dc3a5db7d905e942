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


def one_device_train_setup(variant: str, batch: int, size: int, dtype: str,
                           device: jax.Device | None = None,
                           model_overrides: dict[str, Any] | None = None):
  """The train step every benchmark measures: the variant's ImageNet recipe (the classification
  task's Mixup/CutMix, forward and backward with stochastic depth, AdamW with its schedule and
  weight-decay mask, EMA) at this batch, image size and compute dtype, as `secvit_jax.train_lib`
  builds it for one device
  (default: the first), with `model_overrides` as fields of `config.model` (e.g.
  {'attention_impl': 'cudnn'}). Returns (its config, its `train_lib.TrainSetup`: jitted steps
  that donate the state, abstract state and batch; no arrays yet).

  The one place that builds the benchmarks' train step: adapt it here when train_lib changes.
  """
  # Imported here: train_lib pulls in TensorFlow, which the per-layer scripts do not need.
  from secvit_jax import sharding  # pylint: disable=g-import-not-at-top
  from secvit_jax import train_lib  # pylint: disable=g-import-not-at-top
  from secvit_jax.data import sources  # pylint: disable=g-import-not-at-top
  from secvit_jax.tasks import classification  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'configs.{variant}').get_config()
  config.batch_size = batch
  config.image_size = size
  config.dtype = dtype
  config.mesh.data, config.mesh.fsdp = 1, 1
  for field, value in (model_overrides or {}).items():
    config.model[field] = value
  info = sources.DatasetInfo(num_classes=1000, num_train_examples=1_281_167,
                             num_eval_examples=50_000)
  mesh = sharding.create_mesh(config.mesh, [device or jax.devices()[0]])
  task = classification.ClassificationTask(config, info)
  return config, train_lib.create_train_setup(config, mesh, task)


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
