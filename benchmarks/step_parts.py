"""The train step in wall-clock parts: forward, backward, and the update after them.

    python -m benchmarks.step_parts [--variants secvit_t secvit_s] [--batch 8] [--rounds 4]
        [--json OUT]

Times four compiled programs of the recipe's step (`benchmarks.common.one_device_train_setup`) in
one process, taking turns, each turn an untimed call then a timed one, the figure the minimum
over --rounds turns:
  eval forward    `model.apply(variables, images, train=False)`;
  train loss      the task's loss in training mode (Mixup/CutMix, stochastic depth, batch
                  statistics): the step's forward pass;
  loss and grad   `jax.value_and_grad` of it: forward and backward;
  train step      the whole step (the same, then AdamW, the EMA and the metrics; state donated).
Differences give the backward pass (loss and grad - train loss) and the update (train step - loss
and grad). Unlike `benchmarks.profile_step`'s op times, which count ops that XLA ran at the same
time twice, these are wall-clock times of whole programs. Nothing here is asserted.
"""

from __future__ import annotations

from secvit_jax import host_memory
from secvit_jax import quiet

if __name__ == '__main__':  # First: before JAX and TensorFlow load (host_memory.py, quiet.py).
  host_memory.reexec_with_memory_settings()  # Measure as train.py runs.
  quiet.silence_startup_noise()

# pylint: disable=g-import-not-at-top,wrong-import-position,g-bad-import-order
import argparse
import time
from typing import Any, Callable

import jax

from benchmarks import common
from secvit_jax import model as model_lib

PROGRAMS = ('eval forward', 'train loss', 'loss and grad', 'train step')


def programs(variant: str, batch: int, size: int) -> dict[str, Callable[[], Any]]:
  """The four programs of PROGRAMS, compiled, as calls that return when their work is done."""
  _, setup = common.one_device_train_setup(variant, batch, size, 'float32')
  task, model = setup.task, setup.task.create_model()
  images = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
  data = {'image': images, 'label': jax.random.randint(jax.random.key(1), (batch,), 0, 1000)}
  state = [setup.init_state()]
  # Copies: the step donates (deletes) the state it is given.
  variables = jax.tree.map(lambda leaf: leaf.copy(), state[0].variables)
  params = variables['params']
  model_state = {name: tree for name, tree in variables.items() if name != 'params'}
  rng = jax.random.key(2)

  def loss(params, model_state, data, rng):
    return task.loss(model, params, model_state, data, rng)

  # Arrays go in as arguments: closed over, XLA would fold them into the programs as constants.
  forward = jax.jit(lambda variables, images: model.apply(variables, images, train=False))
  train_loss = jax.jit(loss)
  loss_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
  step = setup.train_step.lower(setup.abstract_state, setup.abstract_batch).compile()

  def train_step():
    state[0], metrics = step(state[0], data)
    return metrics

  calls = dict(zip(PROGRAMS, (lambda: forward(variables, images),
                              lambda: train_loss(params, model_state, data, rng),
                              lambda: loss_and_grad(params, model_state, data, rng), train_step)))
  return {name: (lambda call=call: jax.block_until_ready(call())) for name, call in calls.items()}


def measure(calls: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
  """Minimum seconds per program over `rounds` turns (an untimed call, then a timed one)."""
  best = {name: float('inf') for name in calls}
  for name in calls:  # Compiles and warms every program first.
    calls[name]()
  for _ in range(rounds):
    for name, call in calls.items():
      call()
      start = time.perf_counter()
      call()
      best[name] = min(best[name], time.perf_counter() - start)
  return best


HEADERS = ['variant', *(f'{name} ms' for name in PROGRAMS), 'backward ms', 'update ms',
           'backward / forward']


def table_rows(results: list[dict[str, Any]]) -> list[list[Any]]:
  """The table's rows (HEADERS) of `results` as the JSON holds them."""
  return [[r['variant'], *(r['ms'][name] for name in PROGRAMS), r['backward_ms'], r['update_ms'],
           f"{r['backward_ms'] / r['ms']['train loss']:.2f}×"] for r in results]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--variants', nargs='+', default=['secvit_t', 'secvit_s'],
                      choices=sorted(model_lib.VARIANTS), help='the models (default: t and s)')
  parser.add_argument('--batch', type=int, default=8, help='images per call (default: 8)')
  parser.add_argument('--size', type=int, default=224, help='image side (default: 224)')
  parser.add_argument('--rounds', type=int, default=4, help='timed turns per program (minimum)')
  common.add_output_flags(parser)
  args = parser.parse_args()
  print(common.machine_description())
  results = []
  for variant in args.variants:
    best = measure(programs(variant, args.batch, args.size), args.rounds)
    ms = {name: 1e3 * seconds for name, seconds in best.items()}
    results.append({'variant': variant, 'ms': ms,
                    'backward_ms': ms['loss and grad'] - ms['train loss'],
                    'update_ms': ms['train step'] - ms['loss and grad']})
  common.print_table(HEADERS, table_rows(results))
  common.write_json(args.json, {'batch': args.batch, 'size': args.size, 'rounds': args.rounds,
                                'results': results})


if __name__ == '__main__':
  main()
