"""The release-checkpoint converter: the CLI, and every way a checkpoint can fail to fit."""

import argparse
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import secvit_jax
from secvit_jax import convert
from tests import conftest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_cli(*args):
  return subprocess.run([sys.executable, '-m', 'secvit_jax.convert', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def _save_variant_of_fixture(path, edit):
  """Saves the golden checkpoint after `edit(state_dict)` changed its `model` state dict."""
  with torch.serialization.safe_globals([argparse.Namespace]):
    checkpoint = torch.load(conftest.GOLDEN_PTH, weights_only=True)
  edit(checkpoint['model'])
  torch.save(checkpoint, path)
  return str(path)


def test_cli_refuses_a_checkpoint_of_another_variant_naming_its_keys(tmp_path):
  # The fixture is a reduced configuration: as 'secvit_t' it must fail, naming keys, and leave
  # no output behind.
  output = tmp_path / 'as_secvit_t'
  result = _run_cli('--variant', 'secvit_t', conftest.GOLDEN_PTH, str(output))
  assert result.returncode == 1, result.stderr
  assert 'shape mismatches' in result.stderr
  assert 'proj.weight: shape (64, 128, 1, 1), expected (1024, 512, 1, 1)' in result.stderr
  assert 'missing keys' in result.stderr and 'layers.0.blocks.1.pos.weight' in result.stderr
  assert 'as secvit_t; it matches none of the released variants' in result.stderr
  assert not output.exists() and os.listdir(tmp_path) == []


def test_cli_reports_a_truncated_file(tmp_path):
  truncated = tmp_path / 'truncated.pth'
  with open(conftest.GOLDEN_PTH, 'rb') as f:
    truncated.write_bytes(f.read()[: os.path.getsize(conftest.GOLDEN_PTH) // 2])
  result = _run_cli('--variant', 'secvit_t', '--ema', str(truncated), str(tmp_path / 'out'))
  assert result.returncode == 1
  assert 'truncated.pth: not a readable PyTorch checkpoint' in result.stderr
  assert not (tmp_path / 'out').exists()


def test_missing_unexpected_and_misshapen_keys_are_all_named(golden_model, tmp_path):
  def edit(state_dict):
    del state_dict['layers.1.blocks.0.ffn.fc2.bias']
    state_dict['layers.9.extra.weight'] = torch.zeros(3)
    state_dict['head.weight'] = torch.zeros(11, 64, 1, 1)

  path = _save_variant_of_fixture(tmp_path / 'edited.pth', edit)
  with pytest.raises(convert.ConversionError) as error:
    convert.convert_checkpoint(path, str(tmp_path / 'out'), model=golden_model)
  message = str(error.value)
  assert '1 missing keys:\n    layers.1.blocks.0.ffn.fc2.bias' in message
  assert '1 unexpected keys:\n    layers.9.extra.weight' in message
  assert 'head.weight: shape (11, 64, 1, 1), expected (10, 64, 1, 1)' in message
  assert not (tmp_path / 'out').exists()


def test_rope_buffer_that_disagrees_with_the_formula_is_refused(golden_state_dict, golden_model):
  state_dict = dict(golden_state_dict)
  state_dict['layers.2.RoPE.angle'] = state_dict['layers.2.RoPE.angle'] * 2
  with pytest.raises(convert.ConversionError, match=r'layers\.2\.RoPE\.angle: differs'):
    convert.convert_state_dict(state_dict, golden_model)


def test_ddp_prefix_and_bare_state_dicts_are_read(golden_model, golden_state_dict, tmp_path):
  path = tmp_path / 'ddp.pth'
  torch.save({f'module.{k}': torch.from_numpy(v) for k, v in golden_state_dict.items()}, path)
  state_dict = convert.read_release_checkpoint(str(path))
  assert set(state_dict) == set(golden_state_dict)
  variables = convert.convert_state_dict(state_dict, golden_model)
  np.testing.assert_array_equal(variables['params']['head']['bias'],
                                golden_state_dict['head.bias'])
  with pytest.raises(convert.ConversionError, match="has no 'model_ema' state dict"):
    convert.read_release_checkpoint(str(path), ema=True)


def test_arbitrary_pickled_code_is_not_run(tmp_path):
  marker = tmp_path / 'ran'

  class Payload:
    def __reduce__(self):
      return (os.system, (f'touch {marker}',))

  path = tmp_path / 'malicious.pth'
  torch.save({'model': {}, 'args': Payload()}, path)
  with pytest.raises(convert.ConversionError, match='not a readable PyTorch checkpoint'):
    convert.read_release_checkpoint(str(path))
  assert not marker.exists()


def test_failure_while_writing_leaves_nothing(golden_model, tmp_path, monkeypatch):
  def failing_save(directory, variables, metadata):
    os.makedirs(directory)
    (open(os.path.join(directory, 'partial'), 'w')).close()
    raise OSError('disk full')

  monkeypatch.setattr(convert.checkpoints, 'save_variables', failing_save)
  with pytest.raises(OSError, match='disk full'):
    convert.convert_checkpoint(conftest.GOLDEN_PTH, str(tmp_path / 'out'), model=golden_model)
  assert os.listdir(tmp_path) == []


def test_existing_output_is_never_overwritten(golden_model, tmp_path):
  (tmp_path / 'out').mkdir()
  with pytest.raises(convert.ConversionError, match='exists already'):
    convert.convert_checkpoint(conftest.GOLDEN_PTH, str(tmp_path / 'out'), model=golden_model)


def test_metadata_and_missing_checkpoint_errors(golden_model, tmp_path):
  info = convert.convert_checkpoint(conftest.GOLDEN_PTH, str(tmp_path / 'out'),
                                    model=golden_model, ema=True)
  assert info.ema is True and info.num_classes == 10 and info.variant is None
  assert secvit_jax.checkpoints.read_model_info(str(tmp_path / 'out')) == info
  # Without a variant, model.json lists every architecture field: the model loads from it.
  assert set(info.model_overrides) == set(secvit_jax.checkpoints.architecture_fields())
  model, variables = secvit_jax.load_model(str(tmp_path / 'out'))
  assert model == golden_model
  assert variables['params']['head']['bias'].shape == (10,)
  with pytest.raises(FileNotFoundError, match='holds no SecViT checkpoint'):
    secvit_jax.load_variables(str(tmp_path))


def test_package_imports_without_torch():
  code = ('import sys; sys.modules["torch"] = None\n'
          'import secvit_jax, secvit_jax.convert\n'
          'try:\n'
          '  secvit_jax.convert.read_release_checkpoint("x.pth")\n'
          'except secvit_jax.convert.ConversionError as e:\n'
          '  print(e)\n')
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr
  assert 'requirements-convert.txt' in result.stdout


def _release_checkpoint_of(variant, path, seed=0):
  """A release-layout checkpoint of a full variant with random weights, from the key listing."""
  rng = np.random.default_rng(seed)
  state_dict = {}
  with open(f'{conftest.TESTDATA}/state_dict_{variant}.txt') as f:
    for line in f:
      if line.startswith('#'):
        continue
      key, dtype, shape = line.rstrip('\n').split('\t')
      shape = tuple(int(d) for d in shape.strip('()').split(',') if d.strip())
      if key.endswith('RoPE.angle'):
        value = secvit_jax.model.rope_angle(2 * shape[0])
      elif dtype == 'int64':
        value = np.array(1000, np.int64)
      else:
        value = rng.normal(size=shape).astype(np.float32)
      state_dict[key] = torch.from_numpy(np.asarray(value))
  torch.save({'model': state_dict, 'model_ema': state_dict, 'epoch': 299,
              'args': argparse.Namespace(model='SecViT_T')}, path)
  return state_dict


def test_cli_converts_a_released_variant_and_names_the_right_one(tmp_path):
  state_dict = _release_checkpoint_of('secvit_t', tmp_path / 'secvit_t.pth')
  result = _run_cli('--variant', 'secvit_s', str(tmp_path / 'secvit_t.pth'), str(tmp_path / 's'))
  assert result.returncode == 1
  assert 'as secvit_s; it holds secvit_t: pass --variant secvit_t' in result.stderr
  result = _run_cli('--variant', 'secvit_t', '--ema', str(tmp_path / 'secvit_t.pth'),
                    str(tmp_path / 't'))
  assert result.returncode == 0, result.stderr
  variables = secvit_jax.load_variables(str(tmp_path / 't'))
  np.testing.assert_array_equal(
      variables['params']['stage_2']['block_8']['attn']['qkv']['kernel'],
      state_dict['layers.2.blocks.8.attn.qkv.weight'].numpy()[:, :, 0, 0].T)
  np.testing.assert_array_equal(variables['batch_stats']['stem']['bn_3']['mean'],
                                state_dict['patch_embed.proj.10.running_mean'].numpy())
  info = secvit_jax.checkpoints.read_model_info(str(tmp_path / 't'))
  assert (info.variant, info.model_overrides, info.ema) == ('secvit_t', {}, True)


# ------------------------------------------------------------------------------------------------
# Reduced or modified models: overrides on the command line, recorded in model.json.
# ------------------------------------------------------------------------------------------------

GOLDEN_FLAGS = ('--model.embed_dims=32,64,96,128', '--model.depths', '1,2,2,1',
                '--model.num_heads=(2, 4, 4, 8)', '--model.num_clusters=4,2,2,-1',
                '--model.layer_scales=false,false,true,true', '--model.projection=64')


def test_cli_converts_a_reduced_model_that_load_model_rebuilds(golden, tmp_path):
  output = tmp_path / 'golden'
  result = _run_cli('--variant', 'secvit_t', *GOLDEN_FLAGS, '--model.drop_path_rate=0',
                    '--image_size=64', conftest.GOLDEN_PTH, str(output))
  assert result.returncode == 0, result.stderr
  info = secvit_jax.checkpoints.read_model_info(str(output))
  assert info.model_overrides == {
      name: list(value) if isinstance(value, tuple) else value
      for name, value in conftest.GOLDEN_OVERRIDES_OF_SECVIT_T.items()}
  assert (info.task, info.variant, info.num_classes, info.image_size) == (
      'classification', 'secvit_t', 10, 64)
  model, variables = secvit_jax.load_model(str(output))
  for name, value in conftest.GOLDEN_OVERRIDES_OF_SECVIT_T.items():
    assert getattr(model, name) == value, name
  with jax.default_matmul_precision('highest'):
    logits = jax.jit(lambda v, x: model.apply(v, x))(
        variables, golden['square/input_nchw'].transpose(0, 2, 3, 1))
  np.testing.assert_allclose(logits, golden['square/logits'], rtol=0, atol=1e-4)


def test_overrides_file_and_flags_the_flags_winning(tmp_path, capsys):
  overrides = tmp_path / 'overrides.json'
  overrides.write_text(json.dumps({**{name: list(value) if isinstance(value, tuple) else value
                                      for name, value in conftest.GOLDEN_OVERRIDES_OF_SECVIT_T
                                      .items()}, 'projection': 1024, 'mlp_ratio': 3}))
  names = tmp_path / 'names.txt'
  names.write_text(''.join(f'digit {i}\n' for i in range(10)))
  assert convert.main(['--variant', 'secvit_t', f'--model_overrides={overrides}',
                       '--model.projection=64', '--class_names', str(names),
                       conftest.GOLDEN_PTH, str(tmp_path / 'out')]) == 0
  info = secvit_jax.checkpoints.read_model_info(str(tmp_path / 'out'))
  assert info.model_overrides['projection'] == 64
  assert 'mlp_ratio' not in info.model_overrides  # The variant's own value is not recorded.
  assert info.class_names == tuple(f'digit {i}' for i in range(10))
  assert 'wrote' in capsys.readouterr().err


@pytest.mark.parametrize('flags, message', [
    (('--model.depth=1,2,2,1',), "unknown SecViT field 'depth' (did you mean 'depths'?)"),
    (('--model.num_head=2,4,4,8',), "unknown SecViT field 'num_head' (did you mean 'num_heads'?)"),
    (('--model.dtype=bfloat16',), 'dtype is chosen when a model is loaded'),
    (('--model.depths=1',), 'depths takes one int per stage, e.g. 2,2,9,2; got 1'),
    (('--model.layer_scales=1,0,0,0',), 'layer_scales takes one bool per stage'),
    (('--model.projection=0.5',), 'projection takes an int such as 1024; got 0.5'),
    (('--model.depths=1,2,2,1,1',), 'per-stage fields need a value for each of the 5 stages of '
     'depths, but embed_dims has 4, num_heads has 4, num_clusters has 4, layer_scales has 4'),
    (('--model.depths',), '--model.depths needs a value'),
])
def test_a_bad_override_is_one_line_naming_it_and_writes_nothing(flags, message, tmp_path,
                                                                  capsys):
  assert convert.main(['--variant', 'secvit_t', conftest.GOLDEN_PTH, str(tmp_path / 'out'),
                       *flags]) == 1
  error = capsys.readouterr().err.strip().splitlines()[-1]
  assert message in error
  assert os.listdir(tmp_path) == []


def test_overrides_that_do_not_fit_the_weights_are_named(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(convert, '_fits', lambda state_dict, variant: False)  # Saves 4 traces.
  assert convert.main(['--variant', 'secvit_t', *GOLDEN_FLAGS[:3], conftest.GOLDEN_PTH,
                       str(tmp_path / 'out')]) == 1
  error = capsys.readouterr().err
  assert 'shape mismatches' in error  # secvit_t's num_heads, projection...
  assert error.strip().endswith('as secvit_t with overrides; it matches none of the released '
                                'variants; check the model overrides')
  assert os.listdir(tmp_path) == []


def test_a_model_json_from_before_the_schema_loads_with_defaults(tmp_path):
  model = secvit_jax.create_model('secvit_t', num_classes=10)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
  variables = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), variables)
  old = {'variant': 'secvit_t', 'num_classes': 10, 'source': 'SecViT_T.pth', 'ema': False}
  secvit_jax.checkpoints.save_variables(str(tmp_path / 'old'), variables, old)
  info = secvit_jax.checkpoints.read_model_info(str(tmp_path / 'old'))
  assert info == secvit_jax.checkpoints.ModelInfo(
      variant='secvit_t', num_classes=10, task='classification', model_overrides={},
      image_size=224, class_names=None, source='SecViT_T.pth', ema=False)
  loaded, _ = secvit_jax.load_model(str(tmp_path / 'old'))
  assert loaded == model


def test_model_json_problems_are_named(tmp_path):
  (tmp_path / 'variables').mkdir()
  for text, message in (
      ('{"variant": "secvit_t"', 'not valid JSON'),
      ('{"variant": "secvit_t", "num_classes": 3, "colour": 1}', "unknown keys ['colour']"),
      ('{"variant": "secvit_t"}', "lacks ['num_classes']"),
      ('{"variant": "secvit_t", "num_classes": 3, "class_names": ["a"]}',
       '1 class_names for 3 classes'),
      ('{"variant": "secvit_t", "num_classes": 3, "task": "panoptic"}',
       "holds a 'panoptic' model, which this secvit_jax cannot build"),
      ('{"variant": "secvit_t", "num_classes": 3, "task": "segmentation"}',
       'a segmentation model.json needs task_settings.head'),
      ('{"variant": "secvit_t", "num_classes": 3, "model_overrides": {"depht": [1]}}',
       "unknown SecViT field 'depht' (did you mean 'depths'?)")):
    (tmp_path / 'model.json').write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
      secvit_jax.load_model(str(tmp_path))
