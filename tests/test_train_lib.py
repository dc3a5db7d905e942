"""The trainer's parts without a training run: the recipes' schedules and weight decay,
`load_pretrained`, gradient accumulation with the EMA."""

import importlib

import flax.linen as nn
import jax
import numpy as np
import pytest

from secvit_jax import model as model_lib
from secvit_jax import train_lib
from secvit_jax.data import sources
from secvit_jax.tasks import classification


def test_load_pretrained_names_what_does_not_fit():
  config = importlib.import_module('configs.demo').get_config()
  task = classification.ClassificationTask(config, sources.DatasetInfo(3, 10, 10))
  variables = {'params': {'head': {'bias': np.zeros(3)}, 'proj': {'bias': np.zeros(4)}}}
  merged, notes = task.load_pretrained(
      variables, {'params': {'head': {'bias': np.ones(5)}, 'proj': {'bias': np.ones(4)}}}, 'x')
  np.testing.assert_array_equal(merged['params']['proj']['bias'], np.ones(4))
  assert merged['params']['head']['bias'] is variables['params']['head']['bias']
  assert notes == ['newly initialized (shape differs): params/head/bias (3,) (checkpoint (5,))']
  with pytest.raises(ValueError, match=r'params/proj/bias has shape \(5,\), the model \(4,\); '
                     'params/extra is not in the model'):
    task.load_pretrained(variables, {
        'params': {'head': {'bias': np.ones(3)}, 'proj': {'bias': np.ones(5)},
                   'extra': np.ones(1)}}, 'x')




# ------------------------------------------------------------------------------------------------
# The recipe.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('variant', ['secvit_t', 'secvit_s', 'secvit_b', 'secvit_l'])
def test_variant_configs_follow_the_release(variant):
  config = importlib.import_module(f'configs.{variant}').get_config()
  assert config.model.name == variant
  assert config.model.drop_path_rate == model_lib.VARIANTS[variant]['drop_path_rate']
  durations = train_lib.durations_from_config(config, 1_281_167)
  assert durations.steps_per_epoch == 1251
  assert durations.total_steps == 300 * 1251 and durations.warmup_steps == 5 * 1251
  _, schedule = train_lib.create_optimizer(config, durations)
  np.testing.assert_allclose(schedule(0), 1e-6, rtol=1e-5)
  np.testing.assert_allclose(schedule(durations.warmup_steps), 1e-3, rtol=1e-5)
  np.testing.assert_allclose(schedule(durations.total_steps), 1e-5, rtol=1e-5)
  assert config.mixup.mixup_alpha == 0.8 and config.mixup.label_smoothing == 0.1


def test_weight_decay_spares_biases_and_norms_but_not_layer_scales():
  model = model_lib.create_model('secvit_b', depths=(1, 1, 1, 1), num_classes=10)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 64, 64, 3)))['params'])
  flat = {'/'.join(path): decays for path, decays in
          _flatten(train_lib.weight_decay_mask(shapes)).items()}
  assert flat['stage_2/block_0/gamma_1'] and flat['stage_3/block_0/gamma_2']
  assert flat['stage_0/block_0/attn/qkv/kernel'] and flat['stem/conv_0/kernel']
  assert flat['stage_0/block_0/pos/kernel']  # Depthwise (3, 3, 1, C).
  assert not flat['stage_0/block_0/attn/qkv/bias']
  assert not flat['stage_0/block_0/norm1/scale'] and not flat['stem/bn_0/scale']
  assert sum(flat.values()) == sum(len(shape.shape) > 1 for shape in jax.tree.leaves(shapes)) + 4


def test_weight_decay_rules_for_the_dense_recipes():
  params = {'conv': {'kernel': np.zeros((3, 3, 4, 8)), 'bias': np.zeros(8)},
            'bn': {'scale': np.zeros(8), 'bias': np.zeros(8)},
            'block': {'norm1': {'scale': np.zeros(8), 'bias': np.zeros(8)}}}
  not_norms = _flatten(train_lib.weight_decay_mask(params, 'not_norms'))
  assert not_norms == {('conv', 'kernel'): True, ('conv', 'bias'): True, ('bn', 'scale'): False,
                       ('bn', 'bias'): False, ('block', 'norm1', 'scale'): False,
                       ('block', 'norm1', 'bias'): False}
  assert all(_flatten(train_lib.weight_decay_mask(params, 'all')).values())
  with pytest.raises(ValueError, match="weight_decay_rule must be 'timm', 'not_norms' or 'all'"):
    train_lib.weight_decay_mask(params, 'none')


def test_poly_and_step_schedules_follow_mmcv():
  config = importlib.import_module('configs.demo').get_config()
  opt = config.optimizer
  opt.update(base_lr=6e-5, base_batch_size=config.batch_size, warmup_lr=6e-5 * 1e-6,
             min_lr=0.0, schedule='poly')
  opt.power = 1.0
  durations = train_lib.Durations(steps_per_epoch=10, total_steps=1000, warmup_steps=100,
                                  eval_every_steps=1, checkpoint_every_steps=1, log_every_steps=1)
  _, schedule = train_lib.create_optimizer(config, durations)
  # The warm-up multiplies the poly rate: factor (1e-6 + (1 - 1e-6) t / 100) up to t = 100.
  np.testing.assert_allclose(schedule(0), 6e-11, rtol=1e-4)
  np.testing.assert_allclose(schedule(50), 6e-5 * 0.95 * (1e-6 + (1 - 1e-6) * 0.5), rtol=1e-5)
  np.testing.assert_allclose(schedule(400), 6e-5 * 0.6, rtol=1e-5)
  np.testing.assert_allclose(schedule(1000), 0.0, atol=1e-12)
  opt.update(schedule='step', base_lr=1e-4, warmup_lr=1e-7)
  opt.decay_steps = (800, 950)
  opt.decay_factor = 0.1
  _, schedule = train_lib.create_optimizer(config, durations)
  np.testing.assert_allclose([schedule(0), schedule(100), schedule(799), schedule(800),
                              schedule(999)], [1e-7, 1e-4, 1e-4, 1e-5, 1e-6], rtol=1e-5)


def _flatten(tree, prefix=()):
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


class _TinyClassifier(nn.Module):
  """Dense · BatchNorm · Dense over flattened images: a stand-in for SecViT in step tests."""

  @nn.compact
  def __call__(self, images, train=False):
    x = nn.Dense(8)(images.reshape(images.shape[0], -1))
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(10)(x)


def test_with_accumulation_the_optimizer_and_the_ema_move_on_every_kth_step():
  config = importlib.import_module('configs.demo').get_config()
  config.batch_size, config.image_size = 4, 8
  config.optimizer.accumulation_steps = 2
  config.total_steps = 10
  durations = train_lib.durations_from_config(config, 100)
  model = _TinyClassifier()
  optimizer, schedule = train_lib.create_optimizer(config, durations)
  task = classification.ClassificationTask(config, sources.DatasetInfo(10, 100, 10))
  state = jax.jit(train_lib.make_init_fn(task, model, optimizer, config))()
  step = jax.jit(train_lib.make_train_step(task, model, optimizer, schedule, config))
  batch = {'image': jax.random.normal(jax.random.key(0), (4, 8, 8, 3)),
           'label': jax.numpy.arange(4)}
  kernel = lambda variables: np.asarray(variables['params']['Dense_1']['kernel'])
  after_one, _ = step(state, batch)
  np.testing.assert_array_equal(kernel(after_one.variables), kernel(state.variables))
  np.testing.assert_array_equal(kernel(after_one.ema_variables), kernel(state.ema_variables))
  after_two, _ = step(after_one, batch)
  assert not np.array_equal(kernel(after_two.variables), kernel(state.variables))
  decay = config.ema_decay ** (2 * config.batch_size / 512)
  np.testing.assert_allclose(
      kernel(after_two.ema_variables),
      decay * kernel(state.ema_variables) + (1 - decay) * kernel(after_two.variables),
      rtol=1e-6, atol=1e-7)
