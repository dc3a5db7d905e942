"""Trains and evaluates SecViT with the release's recipe on a JAX device mesh.

`train_and_evaluate(config, workdir)` is the whole program (`train.py` calls it). It reads top to
bottom: durations from the config, the model and optimizer, the train state laid out on the mesh,
the jitted steps, checkpoints, metrics, evaluation, and the training loop.

`create_train_setup(config, mesh, dataset_info)` builds the jitted train step with its shardings
and the abstract (shape, dtype, sharding) state and batch, touching no data and no devices, so a
compile-only benchmark can lower it for any mesh (e.g. of `jax.experimental.topologies` devices):

  setup = create_train_setup(config, mesh, dataset_info)
  compiled = setup.train_step.lower(setup.abstract_state, setup.abstract_batch).compile()

Workdir layout: config.json, model.json (what the checkpoints hold, see `checkpoints`),
metrics.jsonl (one JSON object per line, each with 'step'), tensorboard/ (the same scalars),
checkpoints/<step>/{variables, ema_variables, opt_state}.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
import time
from typing import Any, Callable, Mapping

from etils import epath
import flax
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from secvit_jax import checkpoints
from secvit_jax import input_pipeline
from secvit_jax import mixup
from secvit_jax import model as model_lib
from secvit_jax import sharding

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

# The release scales the learning rate and the EMA decay by the global batch over 512 images.
REFERENCE_BATCH = 512
# Layer-scale factors: stored (1, C, 1, 1) in the release, so timm's rule (no decay on 1-D
# tensors) decays them there; ours are (C,) and are decayed by name to match.
LAYER_SCALE_NAMES = ('gamma_1', 'gamma_2')
# The classifier, re-initialized when `init_from` has a different number of classes.
HEAD_NAME = 'head'
# Checkpoints kept besides the newest ones: the best by this metric.
BEST_METRIC = 'eval_ema/top1'
# Random numbers from XLA's RngBitGenerator: like threefry, the same whatever the sharding, with
# exact split and fold_in, and far cheaper to compile (CPU: the init program in ~1/4 the time).
PRNG_IMPL = 'rbg'


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite; nothing was saved after the last finite step."""


class Preempted(Exception):
  """SIGTERM (or a preemption notice) arrived; a checkpoint of the current step was saved."""


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
    raise ValueError(f'set {prefix}.{name}_steps or {prefix}.{name}_epochs')
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
# Model and optimizer.
# ------------------------------------------------------------------------------------------------


def create_model_from_config(config: ml_collections.ConfigDict,
                             num_classes: int) -> model_lib.SecViT:
  """`config.model.name` with every other field of `config.model` as an override."""
  fields = config.model.to_dict()
  name = fields.pop('name')
  overrides = {key: tuple(value) if isinstance(value, list) else value
               for key, value in fields.items()}
  return model_lib.create_model(name, num_classes=num_classes, dtype=jnp.dtype(config.dtype),
                                **overrides)


def weight_decay_mask(params: Any) -> Any:
  """True where AdamW decays: tensors of two or more dimensions and the layer scales.

  timm's rule as the release applies it: no decay on biases and on LayerNorm/BatchNorm scales
  (1-D); the layer scales γ are decayed (1-D here, (1, C, 1, 1) in the release).
  """
  def decays(path, leaf):
    return leaf.ndim > 1 or path[-1].key in LAYER_SCALE_NAMES
  return jax.tree_util.tree_map_with_path(decays, params)


def effective_batch_size(config: ml_collections.ConfigDict) -> int:
  """Images per optimizer update: the global batch times the gradient accumulation steps."""
  return config.batch_size * config.optimizer.accumulation_steps


def create_optimizer(config: ml_collections.ConfigDict, durations: Durations
                     ) -> tuple[optax.GradientTransformation | optax.MultiSteps, optax.Schedule]:
  """AdamW with masked weight decay, linear warm-up then cosine decay, optional clipping and
  gradient accumulation (then an optax.MultiSteps). The schedule counts optimizer updates."""
  opt = config.optimizer
  accumulation = int(opt.accumulation_steps)
  peak_lr = opt.base_lr * effective_batch_size(config) / REFERENCE_BATCH
  total_updates = max(1, durations.total_steps // accumulation)
  warmup_updates = min(durations.warmup_steps // accumulation, total_updates - 1)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=opt.warmup_lr, peak_value=peak_lr, warmup_steps=warmup_updates,
      decay_steps=total_updates, end_value=opt.min_lr)
  optimizer = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                          weight_decay=opt.weight_decay, mask=weight_decay_mask)
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

  `variables` and `ema_variables` are {'params', 'batch_stats'}, float32.
  """
  step: jax.Array  # () int32: train steps taken.
  variables: dict[str, Any]
  ema_variables: dict[str, Any]
  opt_state: optax.OptState


def make_init_fn(model: model_lib.SecViT,
                 optimizer: optax.GradientTransformation | optax.MultiSteps,
                 config: ml_collections.ConfigDict) -> Callable[[], TrainState]:
  """A function of nothing returning the initial TrainState (parameters from `config.seed`)."""
  def init() -> TrainState:
    images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    initial = model.init({'params': jax.random.key(config.seed, impl=PRNG_IMPL)}, images,
                         train=False)
    variables = {'params': initial['params'], 'batch_stats': initial['batch_stats']}
    return TrainState(
        step=jnp.zeros((), jnp.int32), variables=variables,
        ema_variables=jax.tree.map(jnp.copy, variables),
        opt_state=optimizer.init(variables['params']))
  return init


# ------------------------------------------------------------------------------------------------
# Steps.
# ------------------------------------------------------------------------------------------------


def make_train_step(model: model_lib.SecViT,
                    optimizer: optax.GradientTransformation | optax.MultiSteps,
                    schedule: optax.Schedule, config: ml_collections.ConfigDict,
                    num_classes: int) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """The train step: Mixup/CutMix, forward/backward with stochastic depth, AdamW, EMA.

  The step's batch is {'image': float32 (B, S, S, 3), 'label': int32 (B,)}; its random keys are
  `config.seed` folded with the step. Metrics (replicated scalars): 'loss' (soft-target cross
  entropy), 'grad_norm', 'lr', 'finite' (loss and gradients are finite).
  """
  accumulation = int(config.optimizer.accumulation_steps)
  ema_decay = config.ema_decay ** (effective_batch_size(config) / REFERENCE_BATCH)
  mixing = config.input

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    step_key = jax.random.fold_in(jax.random.key(config.seed, impl=PRNG_IMPL), state.step)
    mix_key, dropout_key = jax.random.split(step_key)
    images, targets = mixup.mix_batch(
        mix_key, batch['image'], batch['label'], num_classes=num_classes,
        mixup_alpha=mixing.mixup_alpha, cutmix_alpha=mixing.cutmix_alpha,
        switch_prob=mixing.mixup_switch_prob, label_smoothing=mixing.label_smoothing)

    def loss_fn(params):
      logits, updated = model.apply(
          {'params': params, 'batch_stats': state.variables['batch_stats']}, images, train=True,
          rngs={'dropout': dropout_key}, mutable=['batch_stats'])
      return optax.softmax_cross_entropy(logits, targets).mean(), updated['batch_stats']

    params = state.variables['params']
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    variables = {'params': optax.apply_updates(params, updates), 'batch_stats': batch_stats}
    decay = ema_decay
    if accumulation > 1:  # The EMA follows optimizer updates, not micro-batches.
      decay = jnp.where(optimizer.has_updated(opt_state), ema_decay, 1.0)
    ema_variables = jax.tree.map(lambda ema, new: decay * ema + (1.0 - decay) * new,
                                 state.ema_variables, variables)
    grad_norm = optax.tree.norm(grads)
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'lr': schedule(state.step // accumulation),
               'finite': jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
    new_state = TrainState(step=state.step + 1, variables=variables,
                           ema_variables=ema_variables, opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_eval_step(model: model_lib.SecViT, num_classes: int
                   ) -> Callable[[dict[str, Any], Batch], Metrics]:
  """Sums over one eval batch of {'image', 'label', 'mask'}: 'loss', 'top1', 'top5' (correct
  predictions among unpadded examples) and 'count' (unpadded examples)."""
  top_k = min(5, num_classes)

  def eval_step(variables: dict[str, Any], batch: Batch) -> Metrics:
    logits = model.apply(variables, batch['image'], train=False)
    labels = batch['label']
    mask = batch['mask'].astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    top1 = jnp.argmax(logits, axis=-1) == labels
    top5 = jnp.any(jax.lax.top_k(logits, top_k)[1] == labels[:, None], axis=-1)
    return {'loss': jnp.sum(loss * mask), 'top1': jnp.sum(top1 * mask),
            'top5': jnp.sum(top5 * mask), 'count': jnp.sum(mask)}

  return eval_step


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """The model, optimizer and jitted functions for one config on one mesh; no arrays.

  `abstract_state` and `abstract_batch` are ShapeDtypeStructs carrying their shardings, ready
  for `train_step.lower(abstract_state, abstract_batch)`.
  """
  model: model_lib.SecViT
  durations: Durations
  mesh: jax.sharding.Mesh
  state_shardings: TrainState
  batch_sharding: jax.sharding.NamedSharding
  abstract_state: TrainState
  abstract_batch: Batch
  init_state: Callable[[], TrainState]  # Jitted: the initial state, created already sharded.
  train_step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]  # Jitted, donates state.
  eval_step: Callable[[dict[str, Any], Batch], Metrics]  # Jitted: (variables, batch) -> sums.


def create_train_setup(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                       dataset_info: input_pipeline.DatasetInfo) -> TrainSetup:
  """Builds the model, optimizer and the jitted init, train and eval steps for `mesh`.

  Parameters and optimizer state are laid out by `config.sharding_rules`, batches split over
  every device. Only `dataset_info` (classes, train examples) is read: no data, no devices.
  """
  durations = durations_from_config(config, dataset_info.num_train_examples)
  model = create_model_from_config(config, dataset_info.num_classes)
  optimizer, schedule = create_optimizer(config, durations)
  init_fn = make_init_fn(model, optimizer, config)
  shapes = jax.eval_shape(init_fn)
  state_shardings = sharding.tree_shardings(shapes, config.sharding_rules, mesh)
  abstract_state = jax.tree.map(
      lambda shape, where: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=where),
      shapes, state_shardings)
  batch_sharding = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  size = config.image_size
  abstract_batch = {
      'image': jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.float32,
                                    sharding=batch_sharding),
      'label': jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=batch_sharding)}
  train_step = jax.jit(
      make_train_step(model, optimizer, schedule, config, dataset_info.num_classes),
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, replicated), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(model, dataset_info.num_classes),
                      in_shardings=(state_shardings.variables, batch_sharding),
                      out_shardings=replicated)
  return TrainSetup(
      model=model, durations=durations, mesh=mesh, state_shardings=state_shardings,
      batch_sharding=batch_sharding, abstract_state=abstract_state,
      abstract_batch=abstract_batch, init_state=jax.jit(init_fn, out_shardings=state_shardings),
      train_step=train_step, eval_step=eval_step)


# ------------------------------------------------------------------------------------------------
# Checkpoints.
# ------------------------------------------------------------------------------------------------


def create_checkpoint_manager(workdir: epath.Path, config: ml_collections.ConfigDict
                              ) -> ocp.CheckpointManager:
  """Asynchronous orbax checkpoints in WORKDIR/checkpoints: the newest `config.keep_checkpoints`
  and the best by EMA top-1 are kept."""
  keep = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(n=config.keep_checkpoints),
      ocp.checkpoint_managers.BestN(get_metric_fn=lambda metrics: metrics[BEST_METRIC], n=1,
                                    keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(preservation_policy=keep,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(checkpoints.manager_directory(workdir), options=options)


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, step: int,
                    metrics: Mapping[str, float] | None = None) -> None:
  """Starts an asynchronous save of `state` as checkpoint `step` (returns once copied to host)."""
  manager.save(step, args=ocp.args.Composite(**{
      checkpoints.VARIABLES_ITEM: ocp.args.StandardSave(state.variables),
      checkpoints.EMA_VARIABLES_ITEM: ocp.args.StandardSave(state.ema_variables),
      checkpoints.OPT_STATE_ITEM: ocp.args.StandardSave(state.opt_state),
  }), metrics=dict(metrics) if metrics else None, force=True)


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, setup: TrainSetup
                       ) -> TrainState:
  """Checkpoint `step`, laid out as `setup.abstract_state` says."""
  abstract = setup.abstract_state
  restored = manager.restore(step, args=ocp.args.Composite(**{
      checkpoints.VARIABLES_ITEM: ocp.args.StandardRestore(abstract.variables),
      checkpoints.EMA_VARIABLES_ITEM: ocp.args.StandardRestore(abstract.ema_variables),
      checkpoints.OPT_STATE_ITEM: ocp.args.StandardRestore(abstract.opt_state),
  }))
  return TrainState(
      step=jax.device_put(np.int32(step), setup.state_shardings.step),
      variables=restored[checkpoints.VARIABLES_ITEM],
      ema_variables=restored[checkpoints.EMA_VARIABLES_ITEM],
      opt_state=restored[checkpoints.OPT_STATE_ITEM])


def load_pretrained(variables: dict[str, Any], shardings: dict[str, Any],
                    loaded: Mapping[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
  """`variables` with every array replaced by its namesake from `loaded` (host arrays), and
  the names of those it kept.

  The classifier (`head`) keeps its initialization when its shape differs (another number of
  classes). Any other missing, extra or mis-shaped array is an error naming it.
  """
  current = flax.traverse_util.flatten_dict(variables, sep='/')
  where = flax.traverse_util.flatten_dict(shardings, sep='/')
  incoming = flax.traverse_util.flatten_dict(dict(loaded), sep='/')
  merged, kept, problems = {}, [], []
  for name, value in current.items():
    if name not in incoming:
      problems.append(f'{name} is missing')
    elif incoming[name].shape == value.shape:
      array = np.asarray(incoming[name], dtype=value.dtype)
      merged[name] = jax.make_array_from_callback(value.shape, where[name],
                                                  lambda index, a=array: a[index])
    elif name.split('/')[1] == HEAD_NAME:
      kept.append(f'{name} {value.shape} (checkpoint {incoming[name].shape})')
      merged[name] = value
    else:
      problems.append(f'{name} has shape {incoming[name].shape}, the model {value.shape}')
  problems += [f'{name} is not in the model' for name in sorted(set(incoming) - set(current))]
  if problems:
    raise ValueError(f'init_from {source} does not fit the model: ' + '; '.join(problems))
  return flax.traverse_util.unflatten_dict(merged, sep='/'), kept


def initialize_from(state: TrainState, setup: TrainSetup, source: str) -> TrainState:
  """`state` with model and EMA variables read from `source` (see `checkpoints.load_variables`)."""
  loaded = checkpoints.load_variables(source)
  shardings = setup.state_shardings.variables
  variables, kept = load_pretrained(state.variables, shardings, loaded, source)
  ema_variables, _ = load_pretrained(state.ema_variables, shardings, loaded, source)
  count = sum(int(np.prod(value.shape)) for value in jax.tree.leaves(loaded['params']))
  logging.info('init_from %s: loaded %d arrays (%d parameters)%s', source,
               len(jax.tree.leaves(loaded)) - len(kept), count,
               '; newly initialized (shape differs): ' + ', '.join(kept) if kept else '')
  return state.replace(variables=variables, ema_variables=ema_variables)


# ------------------------------------------------------------------------------------------------
# Metrics and progress.
# ------------------------------------------------------------------------------------------------


class MetricWriter:
  """Scalars into WORKDIR/metrics.jsonl (a JSON object with 'step' per line) and TensorBoard
  (WORKDIR/tensorboard, as `tf.summary` scalars without needing the tensorboard package). Only
  process 0 writes."""

  def __init__(self, workdir: epath.Path):
    self._enabled = jax.process_index() == 0
    if self._enabled:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
      self._tf = tf
      # What TensorBoard's scalars plugin reads (what `tf.summary.scalar` writes).
      self._scalar_metadata = summary_pb2.SummaryMetadata(
          plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name='scalars'))
      self._summary = tf.summary.create_file_writer(str(workdir / 'tensorboard'))
      self._jsonl = (workdir / 'metrics.jsonl').open('a')

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._enabled:
      return
    self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self._jsonl.flush()
    with self._summary.as_default(step=step):
      for name, value in scalars.items():
        self._tf.summary.write(name, self._tf.constant(value, self._tf.float32),
                               metadata=self._scalar_metadata)
    self._summary.flush()

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._summary.close()


def progress_line(step: int, total_steps: int, summary: Mapping[str, float]) -> str:
  """'step 100/1000 | loss 2.3012 | lr 0.001 | 1234.5 img/s (154.3 per device) | ETA 1h02m03s'."""
  parts = [f'step {step}/{total_steps}', f'loss {summary["train/loss"]:.4f}',
           f'lr {summary["train/lr"]:.3g}']
  if 'train/images_per_second' in summary:
    eta = int(summary['train/eta_seconds'])
    parts += [f'{summary["train/images_per_second"]:.1f} img/s '
              f'({summary["train/images_per_second_per_device"]:.1f} per device)',
              f'ETA {eta // 3600}h{eta % 3600 // 60:02d}m{eta % 60:02d}s']
  return ' | '.join(parts)


class TrainMetrics:
  """Collects each step's device metrics without waiting for them; `check` and `summarize` fetch
  them (the loop's only host syncs) and stop at the first step whose loss is not finite."""

  def __init__(self, total_steps: int, batch_size: int):
    self._total_steps = total_steps
    self._batch_size = batch_size
    self._pending: list[tuple[int, Metrics]] = []
    self._fetched: list[tuple[int, dict[str, np.ndarray]]] = []
    self.restart_clock()

  def add(self, step: int, metrics: Metrics) -> None:
    self._pending.append((step, metrics))
    self._timed_steps += 1

  def restart_clock(self) -> None:
    """Times the speed from now on (e.g. after compilation)."""
    self._interval_start = time.perf_counter()
    self._paused_seconds = 0.0
    self._timed_steps = 0

  def pause(self, seconds: float) -> None:
    """Leaves `seconds` (evaluation, checkpointing) out of the speed."""
    self._paused_seconds += seconds

  def check(self) -> None:
    """Raises NonFiniteLossError naming the first step whose loss or gradient is not finite."""
    for step, metrics in jax.device_get(self._pending):
      if not metrics['finite']:
        raise NonFiniteLossError(
            f'the training loss is {float(metrics["loss"])} (gradient norm '
            f'{float(metrics["grad_norm"])}) at step {step}: training stopped, nothing was saved '
            'after the last finite step')
      self._fetched.append((step, metrics))
    self._pending.clear()

  def summarize(self) -> dict[str, float]:
    """Means of loss and gradient norm since the last summary, the last learning rate, speed."""
    self.check()
    fetched, timed_steps = self._fetched, self._timed_steps
    seconds = time.perf_counter() - self._interval_start - self._paused_seconds
    self._fetched = []
    self.restart_clock()
    summary = {
        'train/loss': float(np.mean([m['loss'] for _, m in fetched])),
        'train/grad_norm': float(np.mean([m['grad_norm'] for _, m in fetched])),
        'train/lr': float(fetched[-1][1]['lr']),
    }
    if timed_steps:  # Not when the interval is only the step that compiled.
      images_per_second = timed_steps * self._batch_size / seconds
      summary.update({
          'train/images_per_second': images_per_second,
          'train/images_per_second_per_device': images_per_second / jax.device_count(),
          'train/eta_seconds': (self._total_steps - fetched[-1][0]) * seconds / timed_steps,
      })
    return summary


class PreemptionWatch:
  """Whether to checkpoint and stop: SIGTERM (one process) or JAX's preemption sync point (several
  processes, where every process must ask at every step)."""

  def __init__(self, manager: ocp.CheckpointManager):
    self._manager = manager
    self._signalled = threading.Event()
    self._previous_handler = None
    if jax.process_count() == 1:
      self._previous_handler = signal.signal(signal.SIGTERM,
                                             lambda *_: self._signalled.set())

  def reached(self, step: int) -> bool:
    return self._manager.reached_preemption(step) or self._signalled.is_set()

  def close(self) -> None:
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)


# ------------------------------------------------------------------------------------------------
# Evaluation.
# ------------------------------------------------------------------------------------------------


def results_line(results: Mapping[str, float]) -> str:
  return ' | '.join(f'{name} {value:.4f}' for name, value in results.items())


def evaluate(setup: TrainSetup, state: TrainState, config: ml_collections.ConfigDict,
             include_ema: bool = True) -> dict[str, float]:
  """Top-1, top-5 and loss of the model (and its EMA) over the whole eval split: 'eval/top1',
  'eval/top5', 'eval/loss', 'eval_ema/...'."""
  models = {'eval': state.variables}
  if include_ema:
    models['eval_ema'] = state.ema_variables
  sums = {prefix: [] for prefix in models}
  for batch in input_pipeline.create_eval_iterator(config, setup.batch_sharding):
    for prefix, variables in models.items():
      sums[prefix].append(setup.eval_step(variables, batch))
  results = {}
  for prefix, per_batch in jax.device_get(sums).items():
    totals = {name: sum(float(batch[name]) for batch in per_batch) for name in per_batch[0]}
    count = max(totals.pop('count'), 1.0)
    results.update({f'{prefix}/{name}': value / count for name, value in totals.items()})
  return results


# ------------------------------------------------------------------------------------------------
# Training loop.
# ------------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Trains (or with `config.eval_only`, evaluates) in `workdir` (local, or gs://... which a
  pod slice's hosts share), resuming from its newest checkpoint when there is one.

  Raises:
    NonFiniteLossError: the loss became non-finite; the checkpoints are left as they were.
    Preempted: after saving a checkpoint of the current step on SIGTERM.
  """
  workdir = checkpoints.as_path(workdir)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
  mesh = sharding.create_mesh(config.mesh)
  dataset_info = input_pipeline.get_dataset_info(config)
  setup = create_train_setup(config, mesh, dataset_info)
  if jax.process_index() == 0:  # What the checkpoints hold, for `secvit_jax.load_model`.
    checkpoints.write_model_info(workdir, checkpoints.model_info_from_config(config, dataset_info))
  durations = setup.durations
  logging.info('%d processes, %d devices, mesh %s; %d classes, %d train / %d eval examples; '
               '%s', jax.process_count(), jax.device_count(), dict(mesh.shape),
               dataset_info.num_classes, dataset_info.num_train_examples,
               dataset_info.num_eval_examples, durations)

  manager = create_checkpoint_manager(workdir, config)
  writer = MetricWriter(workdir)
  try:
    start_step = manager.latest_step()
    if config.eval_only and start_step is None and not config.init_from:
      raise ValueError('eval_only needs config.init_from or a checkpoint in the workdir')
    if start_step is not None:
      logging.info('resuming from %s at step %d', manager.directory, start_step)
      state = restore_checkpoint(manager, start_step, setup)
    else:
      start_step = 0
      state = setup.init_state()
      if config.init_from:
        state = initialize_from(state, setup, config.init_from)

    if config.eval_only:  # The EMA of a checkpoint, none for init_from.
      results = evaluate(setup, state, config, include_ema=start_step > 0)
      logging.info('step %d: %s', start_step, results_line(results))
      writer.write(start_step, results)
      return
    if start_step >= durations.total_steps:
      logging.info('already trained to step %d of %d', start_step, durations.total_steps)
      return
    _train(setup, state, start_step, config, manager, writer)
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.close()


def _train(setup: TrainSetup, state: TrainState, start_step: int,
           config: ml_collections.ConfigDict, manager: ocp.CheckpointManager,
           writer: MetricWriter) -> None:
  """Steps `start_step`+1 to the end: logs, evaluates and checkpoints on schedule."""
  durations = setup.durations
  total = durations.total_steps
  batches = input_pipeline.create_train_iterator(config, setup.batch_sharding,
                                                 start_step=start_step)
  train_metrics = TrainMetrics(total, config.batch_size)
  preemption = PreemptionWatch(manager)
  logging.info('training from step %d to %d', start_step, total)
  started = time.perf_counter()
  try:
    for step in range(start_step + 1, total + 1):
      state, metrics = setup.train_step(state, next(batches))
      train_metrics.add(step, metrics)
      if step == start_step + 1:
        train_metrics.check()
        logging.info('compiled and ran the first step in %.1f s', time.perf_counter() - started)
        train_metrics.restart_clock()
      last = step == total
      preempted = preemption.reached(step)

      if step % durations.log_every_steps == 0 or last:
        summary = train_metrics.summarize()
        logging.info('%s', progress_line(step, total, summary))
        writer.write(step, summary)

      eval_results = None
      if step % durations.eval_every_steps == 0 or last:
        train_metrics.check()  # Nothing non-finite is evaluated or saved.
        started = time.perf_counter()
        eval_results = evaluate(setup, state, config)
        train_metrics.pause(time.perf_counter() - started)
        logging.info('step %d: %s', step, results_line(eval_results))
        writer.write(step, eval_results)

      if step % durations.checkpoint_every_steps == 0 or last or preempted:
        train_metrics.check()
        started = time.perf_counter()
        save_checkpoint(manager, state, step, eval_results)
        train_metrics.pause(time.perf_counter() - started)
      if preempted:
        manager.wait_until_finished()
        raise Preempted(f'preempted: saved the checkpoint of step {step} in '
                        f'{manager.directory}; run the same command again to resume')
  finally:
    preemption.close()
