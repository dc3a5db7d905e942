"""Pictures of SEC's clusters: `python -m secvit_jax.visualize CHECKPOINT IMAGE --out clusters.png`.

    python -m secvit_jax.visualize converted/secvit_s photo.jpg --out clusters.png
    python -m secvit_jax.visualize workdirs/demo digit.png --stage 0 --block 0 --head 1
    python -m secvit_jax.visualize converted/secvit_s photo.jpg --size 448x640

In each clustering block, SEC sorts a head's tokens by the cosine similarity of their key to the
mean key and cuts the sorted sequence into equal clusters. The picture has a panel for the input
as the model sees it (the checkpoint's evaluation crop, or the whole image resized with --size)
and one per clustering stage (or the chosen --stage): every token of the stage's feature map
coloured by its cluster and blended over the image, in colours ordered as the clusters are, blue
for the tokens least like the mean key to red for the most alike. By default the last block of
each stage and head 0.

The clusters come from the `sort_order` the attention sows (`model.apply(...,
mutable=['intermediates'])`, at `stage_{i}/block_{j}/attn/sort_order`): (B, heads, n·s) int32,
the tokens in sort order, where entries below L = h·w are real tokens (row-major r·w + c) and
entries from L on are pad slots, after every real token; n is the stage's cluster count and
s = ceil(L / n) its tokens per cluster, so the token at position p of the order is in cluster
p // s. Matplotlib is not needed: the picture is drawn with PIL and NumPy.
"""

from __future__ import annotations

import argparse
import colorsys
import dataclasses
import math
import os
import re
import sys
from typing import Any, Sequence

import flax
import jax
import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from secvit_jax import cli
from secvit_jax import files
from secvit_jax import model as model_lib
from secvit_jax import predict
from secvit_jax import quiet
from secvit_jax.tasks import classification

SORT_ORDER = re.compile(r'(?:.*/)?stage_(\d+)/block_(\d+)/attn/sort_order')
# Pixels on the longer side of each panel, at least (small inputs are enlarged).
PANEL_SIZE = 384
MARGIN = 16
TITLE_HEIGHT = 44
LEGEND_HEIGHT = 40
TEXT = (40, 40, 40)
BORDER_DARKENING = 0.45  # Pixels on a cluster border keep this much of their colour...
MIN_BORDERED_TOKEN = 12  # ...where tokens are this many pixels wide or more (else borders crowd).


# ------------------------------------------------------------------------------------------------
# Clusters from the model.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StageClusters:
  """The clusters of one head of one block: `cluster_of_token` is (h, w) int32 in [0, n)."""
  stage: int
  block: int
  head: int
  num_clusters: int  # n
  tokens_per_cluster: int  # s = ceil(h·w / n)
  cluster_of_token: np.ndarray


def cluster_map(order: np.ndarray, grid: tuple[int, int], num_clusters: int) -> np.ndarray:
  """Each token's cluster: (n·s,) sort order -> (h, w) int32 (see the module doc).

  Raises:
    ValueError: when `order` does not hold each of the h·w tokens once in n·s positions.
  """
  tokens = grid[0] * grid[1]
  per_cluster = -(-tokens // num_clusters)
  real = np.flatnonzero(order < tokens)
  if order.shape != (num_clusters * per_cluster,) or not np.array_equal(
      np.sort(order[real]), np.arange(tokens)):
    raise ValueError(f'a sort order of shape {order.shape} is not {tokens} tokens in '
                     f'{num_clusters} clusters of {per_cluster}')
  clusters = np.empty(tokens, np.int32)
  clusters[order[real]] = real // per_cluster
  return clusters.reshape(grid)


def find_clusters(model: Any, variables: Any, image: np.ndarray, *,
                  stages: Sequence[int] | None = None, block: int = -1,
                  head: int = 0) -> list[StageClusters]:
  """Runs `model` on one image and reads its clusters.

  Args:
    model, variables: a SecViT or SecViTBackbone and its variables.
    image: float32 (H, W, 3), normalized.
    stages: the stages to read (default: every clustering stage).
    block: the block of each stage, Python-style (default -1: the last).
    head: the attention head.

  Raises:
    ValueError: naming a stage that does not cluster, or a block or head it does not have.
  """
  def sown(model_variables, images):
    return model.apply(model_variables, images, train=False, mutable=['intermediates'])[1]

  def sort_orders(tree):
    """{stage: {block: (B, heads, n·s) sort order}} of the sown intermediates."""
    blocks: dict[int, dict[int, Any]] = {}
    flat = flax.traverse_util.flatten_dict(tree['intermediates'], sep='/')
    for path, value in flat.items():
      if match := SORT_ORDER.fullmatch(path):
        blocks.setdefault(int(match[1]), {})[int(match[2])] = value[0]
    return blocks

  # The choice is checked on the shapes (a trace, no compilation) before the model runs.
  blocks = sort_orders(jax.eval_shape(sown, variables, image[None]))
  grids = model_lib.stage_resolutions(image.shape[0], image.shape[1], len(model.depths))
  counts = model.clusters_per_stage(image.shape[0], image.shape[1])
  if stages is None:
    stages = sorted(blocks)
  chosen = []
  for stage in stages:
    if stage not in blocks:
      raise ValueError(f'stage {stage} does not cluster (the clustering stages are '
                       f'{", ".join(map(str, sorted(blocks))) or "none"})')
    depth = len(blocks[stage])
    if not -depth <= block < depth:
      raise ValueError(f'stage {stage} has no block {block} (its blocks: 0 to {depth - 1})')
    heads = blocks[stage][block % depth].shape[1]
    if not 0 <= head < heads:
      raise ValueError(f'stage {stage} has no head {head} (its heads: 0 to {heads - 1})')
    chosen.append((stage, block % depth))
  orders = sort_orders(jax.jit(sown)(variables, image[None]))
  results = []
  for stage, index in chosen:
    grid = grids[stage]
    count = counts[stage]
    clusters = cluster_map(np.asarray(orders[stage][index][0, head]), grid, count)
    results.append(StageClusters(stage, index, head, count, -(-clusters.size // count), clusters))
  return results


# ------------------------------------------------------------------------------------------------
# Drawing.
# ------------------------------------------------------------------------------------------------


def palette(num_clusters: int) -> np.ndarray:
  """(n, 3) uint8 distinct colours in cluster order: a hue sweep from blue to red."""
  hues = np.linspace(2 / 3, 0, num_clusters) if num_clusters > 1 else np.zeros(1)
  return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb(h, 0.85, 0.95)] for h in hues],
                  np.uint8)


def display_scale(height: int, width: int) -> int:
  """The integer enlargement that brings a height × width image to PANEL_SIZE or more."""
  return max(1, math.ceil(PANEL_SIZE / max(height, width)))


def token_index_map(height: int, width: int, grid: tuple[int, int], scale: int) -> np.ndarray:
  """For each pixel of the image enlarged `scale` times, its token of the (h, w) grid:
  (height·scale, width·scale, 2) int (row, column). A token at stride t covers t×t pixels (the
  last row and column may be cut off)."""
  stride_y, stride_x = math.ceil(height / grid[0]), math.ceil(width / grid[1])
  rows = np.minimum(np.arange(height * scale) // scale // stride_y, grid[0] - 1)
  cols = np.minimum(np.arange(width * scale) // scale // stride_x, grid[1] - 1)
  return np.stack(np.meshgrid(rows, cols, indexing='ij'), axis=-1)


def cluster_panel(view: np.ndarray, clusters: StageClusters, scale: int,
                  alpha: float) -> np.ndarray:
  """The clusters over the image: uint8 (H·scale, W·scale, 3).

  Each pixel is alpha × its token's cluster colour + (1 - alpha) × the image's luminance, and
  darkened where the next pixel right or below belongs to another cluster (when tokens are large
  enough for borders to show).
  """
  height, width = view.shape[:2]
  where = token_index_map(height, width, clusters.cluster_of_token.shape, scale)
  cluster = clusters.cluster_of_token[where[..., 0], where[..., 1]]
  colours = palette(clusters.num_clusters)[cluster].astype(np.float32)
  gray = np.asarray(Image.fromarray(view).convert('L').resize(
      (width * scale, height * scale), Image.Resampling.BICUBIC), np.float32)[..., None]
  blended = alpha * colours + (1 - alpha) * gray
  if scale * height / clusters.cluster_of_token.shape[0] >= MIN_BORDERED_TOKEN:
    border = np.zeros(cluster.shape, bool)
    border[:, :-1] |= cluster[:, :-1] != cluster[:, 1:]
    border[:-1, :] |= cluster[:-1, :] != cluster[1:, :]
    blended[border] *= BORDER_DARKENING
  return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, ImportError, OSError):  # PIL without FreeType: the fixed-size bitmap font.
    return ImageFont.load_default()


def draw_figure(view: np.ndarray, stages: Sequence[StageClusters], input_title: str,
                alpha: float = 0.6) -> Image.Image:
  """The input panel and one panel per entry of `stages`, side by side, each titled, the
  cluster panels above a legend of their colours."""
  height, width = view.shape[:2]
  scale = display_scale(height, width)
  panel_w, panel_h = width * scale, height * scale
  figure = Image.new('RGB', (MARGIN + (panel_w + MARGIN) * (1 + len(stages)),
                             TITLE_HEIGHT + panel_h + LEGEND_HEIGHT + MARGIN), 'white')
  draw = ImageDraw.Draw(figure)
  title_font, text_font = _font(16), _font(13)

  def titled(left, title, subtitle):
    draw.text((left, 6), title, fill=TEXT, font=title_font)
    draw.text((left, 26), subtitle, fill=TEXT, font=text_font)

  figure.paste(Image.fromarray(view).resize((panel_w, panel_h), Image.Resampling.BICUBIC),
               (MARGIN, TITLE_HEIGHT))
  titled(MARGIN, 'input', input_title)
  for index, clusters in enumerate(stages, start=1):
    left = MARGIN + index * (panel_w + MARGIN)
    figure.paste(Image.fromarray(cluster_panel(view, clusters, scale, alpha)),
                 (left, TITLE_HEIGHT))
    h, w = clusters.cluster_of_token.shape
    titled(left, f'stage {clusters.stage} · block {clusters.block} · head {clusters.head}',
           f'{h}x{w} tokens · {clusters.num_clusters} clusters of {clusters.tokens_per_cluster}')
    _draw_legend(draw, text_font, left, TITLE_HEIGHT + panel_h + 6, panel_w,
                 clusters.num_clusters)
  return figure


def _draw_legend(draw: ImageDraw.ImageDraw, font: Any, left: int, top: int, width: int,
                 num_clusters: int) -> None:
  """A strip of the n cluster colours in order, labelled at both ends."""
  colours = palette(num_clusters)
  edges = np.linspace(left, left + width, num_clusters + 1).round().astype(int)
  for colour, start, end in zip(colours, edges[:-1], edges[1:]):
    draw.rectangle((start, top, end - 1, top + 11), fill=tuple(int(c) for c in colour))
  text_top = top + 15
  draw.text((left, text_top), 'cluster 0: least like the mean key', fill=TEXT, font=font)
  draw.text((left + width, text_top), f'{num_clusters - 1}: most alike', fill=TEXT, font=font,
            anchor='ra')


# ------------------------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
  """'HxW' (or 'S' for S×S) -> (H, W); argparse.ArgumentTypeError otherwise."""
  match = re.fullmatch(r'\s*(\d+)\s*(?:[x×]\s*(\d+)\s*)?', text)
  if not match or int(match[1]) < 1 or (match[2] is not None and int(match[2]) < 1):
    raise argparse.ArgumentTypeError(f'{text!r} is not a size HxW such as 448x640')
  return int(match[1]), int(match[2] or match[1])


def main(argv: Sequence[str] | None = None) -> int:
  quiet.silence_startup_noise()
  parser = argparse.ArgumentParser(
      prog=cli.program_name('secvit_jax.visualize'), description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  predict.add_checkpoint_arguments(parser)
  parser.add_argument('image', help='an image file (any format PIL reads)')
  parser.add_argument('--out', default='clusters.png',
                      help='the picture to write (default: clusters.png; format by extension)')
  parser.add_argument('--stage', type=int, help='only this stage (default: every clustering one)')
  parser.add_argument('--block', type=int, default=-1,
                      help='the block of each stage, negative from the end (default: -1, the last)')
  parser.add_argument('--head', type=int, default=0, help='the attention head (default: 0)')
  parser.add_argument('--size', type=parse_size, metavar='HxW',
                      help="resize the whole image to HxW (default: the checkpoint's evaluation "
                      'crop)')
  parser.add_argument('--alpha', type=float, default=0.6,
                      help='opacity of the cluster colours over the image (default: 0.6)')
  options = parser.parse_args(argv)
  if not 0 <= options.alpha <= 1:
    parser.error(f'--alpha must be in [0, 1], got {options.alpha}')
  try:
    info = predict.read_info(options.checkpoint, options.step)
    pixels = predict.read_image(options.image)
    model, variables = predict.load(options.checkpoint, options.step, options.ema)
    view, inputs = classification.prepare_image(pixels, options.size or info.image_size)
    stages = find_clusters(model, variables, inputs,
                           stages=None if options.stage is None else [options.stage],
                           block=options.block, head=options.head)
  except (predict.PredictError, ValueError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  how = 'resized' if options.size else 'central crop'
  figure = draw_figure(view, stages, f'{view.shape[0]}x{view.shape[1]} ({how}) of '
                       f'{os.path.basename(options.image)}', options.alpha)
  try:
    with files.staged(options.out) as staging:
      figure.save(staging)
  except (OSError, ValueError) as error:  # PIL: ValueError for an unknown extension.
    print(f'error: cannot write {options.out}: {error}', file=sys.stderr)
    return 1
  for clusters in stages:
    sizes = np.bincount(clusters.cluster_of_token.ravel(), minlength=clusters.num_clusters)
    print(f'stage {clusters.stage} block {clusters.block} head {clusters.head}: '
          f'{clusters.cluster_of_token.shape[0]}×{clusters.cluster_of_token.shape[1]} tokens in '
          f'{clusters.num_clusters} clusters of {sizes.min()}-{sizes.max()} tokens',
          file=sys.stderr)
  print(f'wrote {options.out} ({figure.width}×{figure.height})', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
