"""Trains and evaluates a task (`secvit_jax.tasks`) on a JAX device mesh: train state, optimizer,
EMA, the jitted steps and the loop. Everything task-specific (model, batches, loss, metrics) comes
from the task; data from the task's `create_data` or from the caller.

`train_and_evaluate(config, workdir)` is the whole program (`train.py` calls it). It reads top to
bottom: the task and its data, the train setup on the mesh, the workdir, the state (resumed,
initialized or loaded), and the training loop with its evaluations and checkpoints.

`create_train_setup(config, mesh, task)` builds the jitted train step with its shardings and the
abstract (shape, dtype, sharding) state and batch, touching no data and no devices, so a
compile-only benchmark can lower it for any mesh (e.g. of `jax.experimental.topologies` devices):

  setup = create_train_setup(config, mesh, task)
  compiled = setup.train_step.lower(setup.abstract_state, setup.abstract_batch).compile()

Workdir layout: config.json, model.json (what the checkpoints hold, see `checkpoints`),
metrics.jsonl and tensorboard/ (see `monitoring`), evaluations.jsonl (`eval_only` results),
checkpoints/<step>/{variables, ema_variables, opt_state}.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from typing import Any, Callable

from absl import logging
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from secvit_jax import checkpoints
from secvit_jax import monitoring
from secvit_jax import sharding
from secvit_jax import tasks
from secvit_jax.data import pipeline
from secvit_jax.tasks import base

Batch = pipeline.Batch
Metrics = base.Metrics

# `config.ema_decay` is per this many images (the release's rule): per step it is
# ema_decay ** (images per update / EMA_DECAY_BATCH).
EMA_DECAY_BATCH = 512
# Layer-scale factors: stored (1, C, 1, 1) in the release, so timm's rule (no decay on 1-D
# tensors) decays them there; ours are (C,) and are decayed by name to match.
LAYER_SCALE_NAMES = ('gamma_1', 'gamma_2')
# Random numbers from XLA's RngBitGenerator: like threefry, the same whatever the sharding, with
# exact split and fold_in, and far cheaper to compile (CPU: the init program in ~1/4 the time).
PRNG_IMPL = 'rbg'


class ConfigError(ValueError):
  """The config (or the workdir it points at) cannot make a run; the message says why."""


# ------------------------------------------------------------------------------------------------
# Durations: every duration of the config, in steps.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Durations:
  """Lengths in training steps (one step = one global batch of `config.batch_size`)."""
  steps_per_epoch: int
  total_steps: int
  warmup_steps: int
  eval_every_steps: int
  checkpoint_every_steps: int
  log_every_steps: int


def steps_from_config(owner: ml_collections.ConfigDict, name: str, steps_per_epoch: int,
                      prefix: str = 'config') -> int:
  """`owner.{name}_steps` when set, else `owner.{name}_epochs` × steps per epoch (rounded)."""
  steps = owner.get(f'{name}_steps')
  if steps is not None:
    return int(steps)
  epochs = owner.get(f'{name}_epochs')
  if epochs is None:
    raise ConfigError(f'set {prefix}.{name}_steps or {prefix}.{name}_epochs')
  return max(1, int(round(epochs * steps_per_epoch)))


def durations_from_config(config: ml_collections.ConfigDict, num_train_examples: int) -> Durations:
  steps_per_epoch = max(1, num_train_examples // config.batch_size)
  return Durations(
      steps_per_epoch=steps_per_epoch,
      total_steps=steps_from_config(config, 'total', steps_per_epoch),
      warmup_steps=steps_from_config(config.optimizer, 'warmup', steps_per_epoch,
                                     'config.optimizer'),
      eval_every_steps=steps_from_config(config, 'eval_every', steps_per_epoch),
      checkpoint_every_steps=steps_from_config(config, 'checkpoint_every', steps_per_epoch),
      log_every_steps=int(config.log_every_steps))


# ------------------------------------------------------------------------------------------------
# Optimizer.
# ------------------------------------------------------------------------------------------------


def weight_decay_mask(params: Any, rule: str = 'timm') -> Any:
  """True where AdamW decays a parameter, by `rule`:

    'timm'       tensors of two or more dimensions and the layer scales γ: timm's rule as the
                 release applies it (no decay on biases and normalization scales, which are 1-D;
                 the γ are 1-D here, (1, C, 1, 1) in the release);
    'not_norms'  everything but the parameters of normalization layers (mmseg's `norm` decay
                 multiplier 0; biases of convolutions and dense layers are decayed);
    'all'        everything.
  A normalization layer is a module with a 'scale' parameter (Flax's LayerNorm, BatchNorm).
  """
  if rule not in ('timm', 'not_norms', 'all'):
    raise ConfigError(f"config.optimizer.weight_decay_rule must be 'timm', 'not_norms' or 'all', "
                      f'got {rule!r}')

  def decays(path, leaf):
    if rule == 'timm':
      return leaf.ndim > 1 or path[-1].key in LAYER_SCALE_NAMES
    if rule == 'not_norms':
      module = params
      for key in path[:-1]:
        module = module[key.key]
      return 'scale' not in module
    return True

  return jax.tree_util.tree_map_with_path(decays, params)


def effective_batch_size(config: ml_collections.ConfigDict) -> int:
  """Images per optimizer update: the global batch times the gradient accumulation steps."""
  return config.batch_size * config.optimizer.accumulation_steps


def learning_rate_schedule(opt: ml_collections.ConfigDict, peak_lr: float, total_updates: int,
                           warmup_updates: int, updates_per_epoch: float = 1.0) -> optax.Schedule:
  """The learning rate per optimizer update, by `opt.schedule`:

    'cosine'  timm's: linear from `warmup_lr` to the peak over the warm-up, then cosine decay to
              `min_lr` at the end;
    'poly'    mmseg's: (peak - min_lr) (1 - t / total) ** `power` + min_lr from update 0;
    'step'    mmdet's: the peak, times `decay_factor` at each of `decay_steps` (updates), or when
              those are not set, after each of `decay_epochs` (× `updates_per_epoch`, rounded);
  and for 'poly' and 'step', mmcv's warm-up multiplies that rate by a factor rising linearly from
  warmup_lr / peak to 1 over the warm-up.
  """
  kind = opt.get('schedule', 'cosine')
  if kind == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        init_value=opt.warmup_lr, peak_value=peak_lr, warmup_steps=warmup_updates,
        decay_steps=total_updates, end_value=opt.min_lr)
  if kind == 'poly':
    main = optax.polynomial_schedule(init_value=peak_lr, end_value=opt.min_lr, power=opt.power,
                                     transition_steps=total_updates)
  elif kind == 'step':
    boundaries = opt.get('decay_steps') or [round(epoch * updates_per_epoch)
                                            for epoch in opt.decay_epochs]
    main = optax.piecewise_constant_schedule(
        peak_lr, {int(step): float(opt.decay_factor) for step in boundaries})
  else:
    raise ConfigError(f"config.optimizer.schedule must be 'cosine', 'poly' or 'step', got "
                      f'{kind!r}')
  if not warmup_updates:  # No warm-up: the first update too gets the full rate.
    return main
  start = opt.warmup_lr / peak_lr if peak_lr else 1.0

  def schedule(update):
    ramp = jnp.minimum(update / max(warmup_updates, 1), 1.0)
    return main(update) * (start + (1.0 - start) * ramp)

  return schedule


def create_optimizer(config: ml_collections.ConfigDict, durations: Durations
                     ) -> tuple[optax.GradientTransformation | optax.MultiSteps, optax.Schedule]:
  """AdamW with masked weight decay and `learning_rate_schedule`, optional clipping and gradient
  accumulation (then an optax.MultiSteps). The peak learning rate is `base_lr` × images per update
  / `base_batch_size`; the schedule counts optimizer updates."""
  opt = config.optimizer
  accumulation = int(opt.accumulation_steps)
  peak_lr = opt.base_lr * effective_batch_size(config) / opt.base_batch_size
  total_updates = max(1, durations.total_steps // accumulation)
  warmup_updates = min(durations.warmup_steps // accumulation, total_updates - 1)
  schedule = learning_rate_schedule(opt, peak_lr, total_updates, warmup_updates,
                                    durations.steps_per_epoch / accumulation)
  rule = opt.get('weight_decay_rule', 'timm')
  optimizer = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                          weight_decay=opt.weight_decay,
                          mask=lambda params: weight_decay_mask(params, rule))
  if opt.grad_clip_norm:
    optimizer = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), optimizer)
  if accumulation > 1:
    optimizer = optax.MultiSteps(optimizer, every_k_schedule=accumulation)
  return optimizer, schedule


# ------------------------------------------------------------------------------------------------
# Train state.
# ------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs; the batches and RNG keys follow from (seed, step).

  `variables` and `ema_variables` are {'params', **model state}, float32; `ema_variables` is None
  when the run keeps no EMA (`config.ema_decay` 0).
  """
  step: jax.Array  # () int32: train steps taken.
  variables: dict[str, Any]
  ema_variables: dict[str, Any] | None
  opt_state: optax.OptState

  def checkpoint_items(self) -> dict[str, Any]:
    """The arrays a checkpoint holds, by orbax item name (the step is the checkpoint's name)."""
    items = {checkpoints.VARIABLES_ITEM: self.variables,
             checkpoints.OPT_STATE_ITEM: self.opt_state}
    if self.ema_variables is not None:
      items[checkpoints.EMA_VARIABLES_ITEM] = self.ema_variables
    return items


def uses_ema(config: ml_collections.ConfigDict) -> bool:
  return bool(config.get('ema_decay'))


def make_init_fn(task: base.Task, model: Any,
                 optimizer: optax.GradientTransformation | optax.MultiSteps,
                 config: ml_collections.ConfigDict) -> Callable[[], TrainState]:
  """A function of nothing returning the initial TrainState (parameters from `config.seed`)."""
  def init() -> TrainState:
    initial = model.init({'params': jax.random.key(config.seed, impl=PRNG_IMPL)},
                         *task.init_inputs(), train=False)
    variables = {name: tree for name, tree in initial.items() if name != 'intermediates'}
    return TrainState(
        step=jnp.zeros((), jnp.int32), variables=variables,
        ema_variables=jax.tree.map(jnp.copy, variables) if uses_ema(config) else None,
        opt_state=optimizer.init(variables['params']))
  return init


# ------------------------------------------------------------------------------------------------
# Steps.
# ------------------------------------------------------------------------------------------------


def make_train_step(task: base.Task, model: Any,
                    optimizer: optax.GradientTransformation | optax.MultiSteps,
                    schedule: optax.Schedule, config: ml_collections.ConfigDict
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """The train step: the task's loss and its gradient, the optimizer update, the EMA.

  The step's random key is `config.seed` folded with the step. Metrics (replicated scalars):
  'loss', the task's own, 'grad_norm', 'lr', 'finite' (loss and gradients are finite).
  """
  accumulation = int(config.optimizer.accumulation_steps)
  ema_decay = (config.get('ema_decay') or 0.0) ** (effective_batch_size(config) / EMA_DECAY_BATCH)

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    rng = jax.random.fold_in(jax.random.key(config.seed, impl=PRNG_IMPL), state.step)
    params = state.variables['params']
    model_state = {name: tree for name, tree in state.variables.items() if name != 'params'}
    (loss, (task_metrics, model_state)), grads = jax.value_and_grad(
        lambda p: task.loss(model, p, model_state, batch, rng), has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    variables = {'params': optax.apply_updates(params, updates), **model_state}
    ema_variables = None
    if state.ema_variables is not None:
      decay = ema_decay
      if accumulation > 1:  # The EMA follows optimizer updates, not micro-batches.
        decay = jnp.where(optimizer.has_updated(opt_state), ema_decay, 1.0)
      ema_variables = jax.tree.map(lambda ema, new: decay * ema + (1.0 - decay) * new,
                                   state.ema_variables, variables)
    grad_norm = optax.tree.norm(grads)
    metrics = {'loss': loss, **task_metrics, 'grad_norm': grad_norm,
               'lr': schedule(state.step // accumulation),
               'finite': jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
    new_state = TrainState(step=state.step + 1, variables=variables,
                           ema_variables=ema_variables, opt_state=opt_state)
    return new_state, metrics

  return train_step


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """The task, optimizer and jitted functions for one config on one mesh; no arrays.

  `abstract_state` and `abstract_batch` are ShapeDtypeStructs carrying their shardings, ready
  for `train_step.lower(abstract_state, abstract_batch)`.
  """
  task: base.Task
  durations: Durations
  state_shardings: TrainState
  batch_sharding: jax.sharding.NamedSharding
  abstract_state: TrainState
  abstract_batch: Batch
  init_state: Callable[[], TrainState]  # Jitted: the initial state, created already sharded.
  train_step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]  # Jitted, donates state.
  eval_step: Callable[[dict[str, Any], Batch], Metrics]  # Jitted: the task's eval outputs.


def create_train_setup(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                       task: base.Task) -> TrainSetup:
  """Builds the model, optimizer and the jitted init, train and eval steps for `mesh`.

  Parameters and optimizer state are laid out by `config.sharding_rules`, batches split over
  every device. Reads only the config and the task: no data, no devices.
  """
  durations = durations_from_config(config, task.info.num_train_examples)
  model = task.create_model()
  optimizer, schedule = create_optimizer(config, durations)
  init_fn = make_init_fn(task, model, optimizer, config)
  shapes = jax.eval_shape(init_fn)
  state_shardings = sharding.tree_shardings(shapes, config.sharding_rules, mesh)
  abstract_state = jax.tree.map(
      lambda shape, where: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=where),
      shapes, state_shardings)
  batch_sharding = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  abstract_batch = {
      name: jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=batch_sharding)
      for name, spec in task.abstract_train_batch(config.batch_size).items()}
  train_step = jax.jit(
      make_train_step(task, model, optimizer, schedule, config),
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, replicated), donate_argnums=0)
  eval_step = jax.jit(lambda variables, batch: task.eval_outputs(model, variables, batch),
                      in_shardings=(state_shardings.variables, batch_sharding),
                      out_shardings=replicated)
  return TrainSetup(
      task=task, durations=durations, state_shardings=state_shardings,
      batch_sharding=batch_sharding, abstract_state=abstract_state,
      abstract_batch=abstract_batch, init_state=jax.jit(init_fn, out_shardings=state_shardings),
      train_step=train_step, eval_step=eval_step)


# ------------------------------------------------------------------------------------------------
# Starting states: a checkpoint, or pretrained weights.
# ------------------------------------------------------------------------------------------------


def restore_state(manager: ocp.CheckpointManager, step: int, setup: TrainSetup) -> TrainState:
  """Checkpoint `step` of `manager`, laid out as `setup.abstract_state` says."""
  abstract = setup.abstract_state
  items = checkpoints.restore_items(manager, step, abstract.checkpoint_items())
  return TrainState(
      step=jax.device_put(np.int32(step), setup.state_shardings.step),
      variables=items[checkpoints.VARIABLES_ITEM],
      ema_variables=items.get(checkpoints.EMA_VARIABLES_ITEM),
      opt_state=items[checkpoints.OPT_STATE_ITEM])


def initialize_from(state: TrainState, setup: TrainSetup, source: str) -> TrainState:
  """`state` with model (and EMA) variables read from `source` (any checkpoint
  `checkpoints.load_variables` reads), as far as the task loads them."""
  loaded = checkpoints.load_variables(source)
  merged, notes = setup.task.load_pretrained(state.variables, loaded, source)
  placed = jax.tree.map(
      lambda leaf, where: jax.make_array_from_callback(leaf.shape, where,
                                                       lambda index, a=leaf: a[index])
      if isinstance(leaf, np.ndarray) else leaf, merged, setup.state_shardings.variables)
  loaded_leaves = [leaf for leaf in jax.tree.leaves(merged) if isinstance(leaf, np.ndarray)]
  logging.info('init_from %s: loaded %d arrays (%d values)%s', source, len(loaded_leaves),
               sum(leaf.size for leaf in loaded_leaves),
               ''.join(f'; {note}' for note in notes))
  ema_variables = None if state.ema_variables is None else jax.tree.map(jnp.copy, placed)
  return state.replace(variables=placed, ema_variables=ema_variables)


# ------------------------------------------------------------------------------------------------
# Evaluation.
# ------------------------------------------------------------------------------------------------


def evaluate(setup: TrainSetup, state: TrainState, data: pipeline.Data, *,
             workdir: Any, step: int, include_ema: bool = True) -> dict[str, float]:
  """The task's metrics of the model ('eval/...') and its EMA ('eval_ema/...', when the state has
  one and `include_ema`) over the whole evaluation split."""
  models = {'eval': state.variables}
  if include_ema and state.ema_variables is not None:
    models['eval_ema'] = state.ema_variables
  evaluators = {prefix: setup.task.create_evaluator(workdir=workdir, step=step, prefix=prefix)
                for prefix in models}
  for batch in data.eval_batches(setup.batch_sharding):
    for prefix, variables in models.items():
      evaluators[prefix].add(setup.eval_step(variables, batch))
  return {f'{prefix}/{name}': value for prefix, evaluator in evaluators.items()
          for name, value in evaluator.result().items()}


def best_metric_name(config: ml_collections.ConfigDict, task: base.Task) -> str:
  """The logged result that keeps the best checkpoint: the task's, of the EMA when there is one."""
  return f'{"eval_ema" if uses_ema(config) else "eval"}/{task.best_metric}'


# ------------------------------------------------------------------------------------------------
# The program.
# ------------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       data: pipeline.Data | None = None) -> None:
  """Trains in `workdir` (local, or gs://... which a pod slice's hosts share), resuming from its
  newest checkpoint when there is one; with `config.eval_only`, evaluates instead.

  Args:
    config: the run's config.
    workdir: where checkpoints and metrics go.
    data: the data to train and evaluate on; default the task's own (`Task.create_data`).

  Raises:
    ConfigError: before anything is written, when the config cannot make a run.
    monitoring.NonFiniteLossError: the loss became non-finite; checkpoints are left as they were.
    monitoring.Stopped: after saving a checkpoint of the current step on a signal.
  """
  try:
    task_class = tasks.get_task_class(config.get('task', 'classification'))
  except ValueError as error:
    raise ConfigError(str(error)) from None
  workdir = checkpoints.as_path(workdir)
  if config.eval_only and not checkpoints.training_steps(workdir) and not config.init_from:
    raise ConfigError(f'eval_only: {workdir} holds no checkpoint and config.init_from is not '
                      'set: nothing to evaluate')
  data = data or task_class.create_data(config)
  task = task_class(config, data.info)
  mesh = sharding.create_mesh(config.mesh)
  setup = create_train_setup(config, mesh, task)
  logging.info('%d processes, %d devices, mesh %s; task %s; %d classes, %d train / %d eval '
               'examples; %s', jax.process_count(), jax.device_count(), dict(mesh.shape),
               task.name, data.info.num_classes, data.info.num_train_examples,
               data.info.num_eval_examples, setup.durations)
  if config.eval_only:
    _evaluate_only(setup, data, config, workdir)
    return

  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
    checkpoints.write_model_info(workdir, task.model_info())
  manager = checkpoints.create_manager(workdir, keep=config.keep_checkpoints,
                                       best_metric=best_metric_name(config, task))
  writer = monitoring.MetricWriter(workdir)
  stop = monitoring.StopSignals(manager)
  try:
    start_step = manager.latest_step()
    if start_step is not None:
      logging.info('resuming from %s at step %d', manager.directory, start_step)
      state = restore_state(manager, start_step, setup)
    else:
      start_step = 0
      state = setup.init_state()
      if config.init_from:
        state = initialize_from(state, setup, config.init_from)
    if start_step >= setup.durations.total_steps:
      logging.info('already trained to step %d of %d', start_step, setup.durations.total_steps)
      return
    _train(setup, state, start_step, data, config, workdir, manager, writer, stop)
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.close()
    stop.close()


def _evaluate_only(setup: TrainSetup, data: pipeline.Data, config: ml_collections.ConfigDict,
                   workdir: Any) -> None:
  """Evaluates the newest checkpoint of `workdir` (model and EMA), else `config.init_from`, and
  appends the results to WORKDIR/evaluations.jsonl, apart from the training curves."""
  steps = checkpoints.training_steps(workdir)
  if steps:
    step = steps[-1]
    source = str(checkpoints.manager_directory(workdir) / str(step))
    logging.info('evaluating the checkpoint of step %d in %s', step,
                 checkpoints.manager_directory(workdir))
    manager = checkpoints.create_manager(workdir, keep=1, best_metric=None, read_only=True)
    abstract = setup.abstract_state.checkpoint_items()
    abstract.pop(checkpoints.OPT_STATE_ITEM)
    if not (checkpoints.as_path(source) / checkpoints.EMA_VARIABLES_ITEM).is_dir():
      abstract.pop(checkpoints.EMA_VARIABLES_ITEM, None)
    try:
      items = checkpoints.restore_items(manager, step, abstract)
    finally:
      manager.close()
    state = TrainState(step=np.int32(step), variables=items[checkpoints.VARIABLES_ITEM],
                       ema_variables=items.get(checkpoints.EMA_VARIABLES_ITEM), opt_state=None)
  else:
    step, source = 0, config.init_from
    logging.info('evaluating %s', source)
    state = initialize_from(setup.init_state(), setup, source)
  # The EMA of init_from would be the same weights.
  results = evaluate(setup, state, data, workdir=workdir, step=step, include_ema=bool(steps))
  logging.info('step %d: %s', step, monitoring.results_line(results))
  monitoring.record_evaluation(workdir, {
      'step': step, 'checkpoint': source,
      'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      **results})


def _train(setup: TrainSetup, state: TrainState, start_step: int, data: pipeline.Data,
           config: ml_collections.ConfigDict, workdir: Any, manager: ocp.CheckpointManager,
           writer: monitoring.MetricWriter, stop: monitoring.StopSignals) -> None:
  """Steps `start_step`+1 to the end: logs, evaluates and checkpoints on schedule."""
  durations = setup.durations
  total = durations.total_steps
  batches = data.train_batches(setup.batch_sharding, start_step)
  train_metrics = monitoring.TrainMetrics(total, config.batch_size)
  logging.info('training from step %d to %d', start_step, total)
  started = time.perf_counter()
  for step in range(start_step + 1, total + 1):
    state, metrics = setup.train_step(state, next(batches))
    train_metrics.add(step, metrics)
    if step == start_step + 1:
      train_metrics.check()
      logging.info('compiled and ran the first step in %.1f s', time.perf_counter() - started)
      train_metrics.restart_clock()
    last = step == total
    stopping = stop.should_stop(step)

    if step % durations.log_every_steps == 0 or last:
      summary = train_metrics.summarize()
      logging.info('%s', monitoring.progress_line(step, total, summary))
      writer.write(step, summary)

    eval_results = None
    if step % durations.eval_every_steps == 0 or last:
      train_metrics.check()  # Nothing non-finite is evaluated or saved.
      started = time.perf_counter()
      eval_results = evaluate(setup, state, data, workdir=workdir, step=step)
      train_metrics.pause(time.perf_counter() - started)
      logging.info('step %d: %s', step, monitoring.results_line(eval_results))
      writer.write(step, eval_results)

    if step % durations.checkpoint_every_steps == 0 or last or stopping:
      train_metrics.check()
      started = time.perf_counter()
      checkpoints.save_items(manager, step, state.checkpoint_items(), eval_results)
      train_metrics.pause(time.perf_counter() - started)
    if stopping:
      manager.wait_until_finished()
      raise monitoring.Stopped(
          f'stopped by {stop.signal_name}: saved the checkpoint of step {step} in '
          f'{manager.directory}; run the same command again to resume', stop.signal_number)
