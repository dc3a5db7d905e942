"""`python -m secvit_jax.predict`, class names, and `load_model` from a training workdir."""

import dataclasses
import importlib.resources
import io
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import skimage.data
from PIL import Image

import secvit_jax
from configs import demo
from secvit_jax import checkpoints
from secvit_jax import class_names
from secvit_jax import predict
from secvit_jax import tasks
from secvit_jax import train_lib
from secvit_jax.data import classification as classification_data
from secvit_jax.data import sources
from secvit_jax.tasks import classification
from tests import conftest

TFDS_LABELS = os.path.join(conftest.TESTDATA, 'tfds', 'imagenet2012', '5.1.0', 'label.labels.txt')


@pytest.fixture(scope='module')
def photographs(tmp_path_factory):
  """scikit-image's astronaut as PNG, its cat as PNG and TIFF (same pixels), a text file."""
  directory = tmp_path_factory.mktemp('images')
  Image.fromarray(skimage.data.astronaut()).save(directory / 'astronaut.png')
  Image.fromarray(skimage.data.chelsea()).save(directory / 'chelsea.png')
  Image.fromarray(skimage.data.chelsea()).save(directory / 'chelsea.tiff')
  (directory / 'notes.txt').write_text('not an image')
  return directory


def _run(argv, capsys):
  """predict.main(argv) -> (exit status, stdout, stderr)."""
  status = predict.main([str(arg) for arg in argv])
  out, err = capsys.readouterr()
  return status, out, err


# ------------------------------------------------------------------------------------------------
# Class names.
# ------------------------------------------------------------------------------------------------


def test_imagenet_names_are_the_1000_classes_in_tfds_order():
  with open(TFDS_LABELS) as f:
    synsets = f.read().split()
  text = (importlib.resources.files('secvit_jax') / class_names.IMAGENET_CLASSES_FILE
          ).read_text()
  assert len(text.splitlines()) == 1000 and text.endswith('\n')
  classes = class_names.imagenet_classes()
  assert [synset for synset, _ in classes] == synsets
  assert all(lemmas.strip() for _, lemmas in classes)
  assert classes[0] == ('n01440764', 'tench, Tinca tinca')
  assert classes[281] == ('n02123045', 'tabby, tabby cat')


def test_class_names_from_the_checkpoint_imagenet_or_indices():
  def names(**fields):
    info = checkpoints.ModelInfo(variant='secvit_t', **fields)
    return [(c.label, c.name) for c in class_names.class_names(info)]

  imagenet = names(num_classes=1000)  # A converted release checkpoint records no names.
  assert imagenet[281] == ('n02123045', 'tabby')
  # The two cranes (bird, machine) and two maillots differ by their synset.
  assert imagenet[134] == ('n02012849', 'crane (n02012849)')
  assert imagenet[517] == ('n03126707', 'crane (n03126707)')
  assert names(num_classes=1000, class_names=tuple(f'c{i}' for i in range(1000)))[5] == (
      'c5', 'c5')
  # A folder of ImageNet synsets reads as words; other names as they are.
  assert names(num_classes=3, class_names=('n02123045', 'n01440764', 'rocks')) == [
      ('n02123045', 'tabby'), ('n01440764', 'tench'), ('rocks', 'rocks')]
  assert names(num_classes=3) == [('0', '0'), ('1', '1'), ('2', '2')]


# ------------------------------------------------------------------------------------------------
# The command line on photographs.
# ------------------------------------------------------------------------------------------------


def test_predict_json_on_photographs_matches_the_model(golden_checkpoint, photographs, capsys):
  images = [photographs / name for name in ('astronaut.png', 'chelsea.png', 'chelsea.tiff')]
  status, out, err = _run([golden_checkpoint, *images, '--json', '--top', '10'], capsys)
  assert status == 0, err
  document = json.loads(out)
  assert (document['task'], document['variant'], document['image_size']) == (
      'classification', 'secvit_t', 64)
  results = document['results']
  assert [result['image'] for result in results] == [str(image) for image in images]
  for result in results:
    probabilities = [entry['probability'] for entry in result['top']]
    assert sorted(probabilities, reverse=True) == probabilities
    assert sorted(entry['class'] for entry in result['top']) == list(range(10))
    np.testing.assert_allclose(sum(probabilities), 1, atol=1e-5)
  assert results[1]['top'] == results[2]['top']  # The same pixels as PNG and as TIFF.

  # The input pipeline's own evaluation transform (TensorFlow's decoding) gives the same answer.
  model, variables = secvit_jax.load_model(golden_checkpoint)
  image = classification_data.preprocess_for_eval((photographs / 'astronaut.png').read_bytes(), 64)
  logits = jax.jit(model.apply)(variables, np.asarray(image)[None])
  expected = np.asarray(jax.nn.softmax(logits[0]))
  for entry in results[0]['top']:
    np.testing.assert_allclose(entry['probability'], expected[entry['class']], atol=1e-6)


def test_the_table_shows_rank_probability_and_name():
  result = {'top': [
      {'class': 281, 'label': 'n02123045', 'name': 'tabby', 'description': 'tabby, tabby cat',
       'probability': 0.6234},
      {'class': 134, 'label': 'n02012849', 'name': 'crane (n02012849)', 'description': 'crane',
       'probability': 0.05}]}
  assert classification.ClassificationTask.show('cat.jpg', result, None).splitlines() == [
      'cat.jpg',
      '  rank  probability  class',
      '     1       62.34%  tabby  [n02123045]',
      '     2        5.00%  crane (n02012849)']


def test_a_file_that_is_not_an_image_is_one_line_and_nothing_runs(golden_checkpoint, photographs,
                                                                  capsys, monkeypatch):
  monkeypatch.setattr(tasks, 'load_model', lambda *a, **k: pytest.fail('model loaded'))
  for name, message in (('notes.txt', 'not an image PIL can read (cannot identify image file)'),
                        ('missing.jpg', 'no such file')):
    status, out, err = _run([golden_checkpoint, photographs / 'astronaut.png', photographs / name],
                            capsys)
    assert (status, out) == (1, '')
    assert err.strip().splitlines() == [f'error: {photographs / name}: {message}']


def test_a_truncated_image_and_a_missing_checkpoint_are_one_line(golden_checkpoint, tmp_path,
                                                                  capsys):
  encoded = io.BytesIO()
  Image.fromarray(skimage.data.astronaut()).save(encoded, 'JPEG')
  (tmp_path / 'cut.jpg').write_bytes(encoded.getvalue()[:5000])
  status, _, err = _run([golden_checkpoint, tmp_path / 'cut.jpg'], capsys)
  [line] = err.strip().splitlines()
  assert status == 1 and line.startswith(
      f'error: {tmp_path / "cut.jpg"}: not an image PIL can read (image file is truncated')
  status, _, err = _run([tmp_path, tmp_path / 'cut.jpg'], capsys)
  assert status == 1 and 'holds no SecViT checkpoint' in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------------------
# Training workdirs.
# ------------------------------------------------------------------------------------------------


def _tiny_demo_config():
  config = demo.get_config()
  config.model.update({'embed_dims': (16,), 'depths': (1,), 'num_heads': (2,),
                       'num_clusters': (4,), 'projection': 32})
  return config


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A workdir as train.py leaves it after step 7 of a tiny digits model: model.json, config.json,
  checkpoints/7 (variables, an EMA that differs, AdamW state). Returns (path, state)."""
  directory = tmp_path_factory.mktemp('workdir')
  config = _tiny_demo_config()
  dataset_info = classification_data.ClassificationData(config).info
  checkpoints.write_model_info(directory,
                               checkpoints.model_info_from_config(config, dataset_info,
                                                                  task='classification'))
  (directory / 'config.json').write_text(config.to_json_best_effort(indent=2))
  model = classification.ClassificationTask(config, dataset_info).create_model()
  shapes = jax.eval_shape(  # Random values without running init op by op (seconds).
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda leaf: rng.normal(0, 0.1, leaf.shape).astype(np.float32), shapes)
  state = train_lib.TrainState(
      step=jnp.int32(7), variables=variables,
      ema_variables=jax.tree.map(lambda x: x * 0.5, variables),
      opt_state=optax.adamw(1e-3).init(variables['params']))
  manager = checkpoints.create_manager(checkpoints.as_path(directory),
                                       keep=config.keep_checkpoints, best_metric=None)
  checkpoints.save_items(manager, 7, state.checkpoint_items())
  manager.wait_until_finished()
  manager.close()
  return directory, state


def test_load_model_from_a_training_workdir(workdir):
  directory, state = workdir
  info = checkpoints.read_model_info(directory)
  assert info == checkpoints.ModelInfo(
      variant='secvit_t', num_classes=10, task='classification',
      model_overrides={'embed_dims': [16], 'depths': [1], 'num_heads': [2], 'num_clusters': [4],
                       'projection': 32, 'drop_path_rate': 0.05},
      image_size=32, class_names=tuple('0123456789'), source='trained on digits')
  model, variables = secvit_jax.load_model(directory)
  assert model == classification.ClassificationTask(
      _tiny_demo_config(), sources.DatasetInfo(10, 1437, 360)).create_model()
  jax.tree.map(np.testing.assert_array_equal, variables, jax.device_get(state.variables))
  for path in (directory / 'checkpoints', directory / 'checkpoints' / '7'):
    _, ema = secvit_jax.load_model(path, ema=True)
    jax.tree.map(np.testing.assert_array_equal, ema, jax.device_get(state.ema_variables))
  with pytest.raises(FileNotFoundError, match=r'has no checkpoint of step 8; it has \[7\]'):
    secvit_jax.load_model(directory, step=8)


def test_a_workdir_from_before_model_json_is_read_from_its_config(workdir, tmp_path):
  directory, _ = workdir
  old = tmp_path / 'old'
  shutil.copytree(directory / 'checkpoints', old / 'checkpoints')
  (old / 'config.json').write_text((directory / 'config.json').read_text())
  info = checkpoints.read_model_info(old)
  assert info == dataclasses.replace(checkpoints.read_model_info(directory),
                                                 class_names=None)
  (old / 'config.json').unlink()
  with pytest.raises(FileNotFoundError, match='no model.json says which model'):
    checkpoints.read_model_info(old)


def test_predict_a_digit_with_the_workdir_ema(workdir, tmp_path, capsys):
  directory, _ = workdir
  digit = np.kron(np.eye(8, dtype=np.uint8) * 255, np.ones((4, 4), np.uint8))  # A stroke.
  Image.fromarray(digit).save(tmp_path / 'digit.gif')  # Grayscale GIF: converted to RGB.
  status, out, err = _run([directory, '--ema', '--step', '7', tmp_path / 'digit.gif', '--json'],
                          capsys)
  assert status == 0, err
  [result] = json.loads(out)['results']
  assert len(result['top']) == 5
  assert {entry['label'] for entry in result['top']} <= set('0123456789')
  assert 'secvit_t, 10 classes, evaluated at 32×32' in err
