"""`python -m secvit_jax.visualize`: the clusters it draws are the model's sort order."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from PIL import Image

import secvit_jax
from secvit_jax import predict
from secvit_jax.tasks import classification
from secvit_jax import visualize


def _clusters_of_order(order, tokens, num_clusters):
  """{cluster: set of tokens} straight from a sort order (n·s,) with pad slots >= tokens."""
  per_cluster = -(-tokens // num_clusters)
  return {c: {int(t) for t in order[c * per_cluster:(c + 1) * per_cluster] if t < tokens}
          for c in range(num_clusters)}


def _clusters_of_map(cluster_of_token):
  flat = cluster_of_token.ravel()
  return {int(c): set(np.flatnonzero(flat == c).tolist()) for c in np.unique(flat)}


def test_cluster_map_follows_the_padded_contract():
  # 2×5 = 10 tokens in 4 clusters of 3: two pad slots (10, 11), after every real token.
  order = np.array([7, 2, 9, 0, 4, 1, 8, 3, 6, 5, 10, 11])
  clusters = visualize.cluster_map(order, (2, 5), 4)
  assert clusters.tolist() == [[1, 1, 0, 2, 1], [3, 2, 0, 2, 0]]
  assert _clusters_of_map(clusters) == _clusters_of_order(order, 10, 4)
  with pytest.raises(ValueError, match=r'not 10 tokens in 4 clusters of 3'):
    visualize.cluster_map(np.array([7, 2, 9, 0, 4, 1, 8, 3, 6, 6, 10, 11]), (2, 5), 4)


def test_clusters_are_the_release_sort_order(golden_checkpoint, golden):
  model, variables = secvit_jax.load_model(golden_checkpoint)
  image = golden['square/input_nchw'][0].transpose(1, 2, 0)
  with jax.default_matmul_precision('highest'):
    [clusters] = visualize.find_clusters(model, variables, image, stages=[0], block=0, head=1)
  assert (clusters.num_clusters, clusters.tokens_per_cluster) == (4, 64)
  release_order = golden['square/block0_sort_indices'][0, 1]
  assert _clusters_of_map(clusters.cluster_of_token) == _clusters_of_order(release_order, 256, 4)


def test_the_picture_colours_each_cluster_of_the_sort_order_apart(golden_checkpoint, tmp_path,
                                                                  capsys):
  Image.fromarray(skimage.data.chelsea()).save(tmp_path / 'chelsea.jpg')
  out = tmp_path / 'clusters.png'
  # Opaque colours, a non-square size: every stage's clusters and a picture to compare.
  status = visualize.main([golden_checkpoint, str(tmp_path / 'chelsea.jpg'), '--out', str(out),
                           '--alpha', '1', '--size', '64x96'])
  err = capsys.readouterr().err
  assert status == 0, err
  assert 'stage 0 block 0 head 0: 16×24 tokens in 4 clusters of 96-96 tokens' in err
  assert sorted(os.listdir(tmp_path)) == ['chelsea.jpg', 'clusters.png']
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask  # Written atomically, not private.

  # The model's own sort orders for the same input.
  model, variables = secvit_jax.load_model(golden_checkpoint)
  _, inputs = classification.prepare_image(predict.read_image(str(tmp_path / 'chelsea.jpg')),
                                           (64, 96))
  _, sown = jax.jit(lambda v, x: model.apply(v, x, mutable=['intermediates']))(
      variables, inputs[None])
  picture = np.asarray(Image.open(out).convert('RGB'))
  scale = visualize.display_scale(64, 96)
  panel_height, panel_width = 64 * scale, 96 * scale
  assert picture.shape == (visualize.TITLE_HEIGHT + panel_height + visualize.LEGEND_HEIGHT +
                           visualize.MARGIN, visualize.MARGIN + 4 * (panel_width +
                                                                     visualize.MARGIN), 3)
  for panel, (stage, block, clusters) in enumerate(((0, 0, 4), (1, 1, 2), (2, 1, 2)), start=1):
    order = np.asarray(sown['intermediates'][f'stage_{stage}'][f'block_{block}']['attn'][
        'sort_order'][0][0, 0])
    height, width = 16 >> stage, 24 >> stage
    stride = 4 << stage
    # The colour at the centre of each token of the panel.
    left = visualize.MARGIN + panel * (panel_width + visualize.MARGIN)
    rows = visualize.TITLE_HEIGHT + (np.arange(height) * stride + stride // 2) * scale
    cols = left + (np.arange(width) * stride + stride // 2) * scale
    colours = picture[rows[:, None], cols[None, :]].reshape(-1, 3)
    palette = visualize.palette(clusters)
    assert len({tuple(c) for c in palette}) == clusters  # Distinct colours.
    by_colour = {}
    for token, colour in enumerate(map(tuple, colours)):
      by_colour.setdefault(colour, set()).add(token)
    assert {tuple(c) for c in palette} == set(by_colour)
    expected = _clusters_of_order(order, height * width, clusters)
    assert {c: by_colour[tuple(palette[c])] for c in range(clusters)} == expected


@pytest.mark.parametrize('flags, message', [
    (('--stage', '3'), 'stage 3 does not cluster (the clustering stages are 0, 1, 2)'),
    (('--stage', '0', '--block', '1'), 'stage 0 has no block 1 (its blocks: 0 to 0)'),
    (('--block', '-3'), 'stage 0 has no block -3 (its blocks: 0 to 0)'),
    (('--head', '4'), 'stage 0 has no head 4 (its heads: 0 to 1)'),
    (('--out', 'clusters.unknown'), 'cannot write'),
])
def test_a_bad_choice_is_one_line_and_writes_nothing(golden_checkpoint, flags, message, tmp_path,
                                                     capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  Image.fromarray(skimage.data.astronaut()[::4, ::4]).save(tmp_path / 'astronaut.png')
  if '--out' in flags:  # Only drawing remains: skip the model.
    monkeypatch.setattr(visualize, 'find_clusters', lambda *args, **kwargs: [])
  status = visualize.main([golden_checkpoint, 'astronaut.png', *flags])
  [line] = capsys.readouterr().err.strip().splitlines()
  assert status == 1 and line.startswith('error: ') and message in line
  assert os.listdir(tmp_path) == ['astronaut.png']


def test_sizes_on_the_command_line():
  assert visualize.parse_size('448x640') == (448, 640)
  assert visualize.parse_size('96') == (96, 96)
  assert visualize.parse_size(' 64 × 96 ') == (64, 96)
  for text in ('0x5', '64x', 'x64', '64*96', '-1'):
    with pytest.raises(visualize.argparse.ArgumentTypeError, match='is not a size HxW'):
      visualize.parse_size(text)


def test_a_file_that_is_not_an_image_is_one_line(golden_checkpoint, tmp_path, capsys):
  (tmp_path / 'notes.txt').write_text('not an image')
  assert visualize.main([golden_checkpoint, str(tmp_path / 'notes.txt')]) == 1
  assert capsys.readouterr().err.strip() == (
      f'error: {tmp_path / "notes.txt"}: not an image PIL can read (cannot identify image file)')
