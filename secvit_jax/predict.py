"""Runs a SecViT checkpoint on image files: `python -m secvit_jax.predict CHECKPOINT IMAGE...`.

    python -m secvit_jax.predict converted/secvit_s photo.jpg scan.tiff
    python -m secvit_jax.predict workdirs/demo --ema --json digit.png
    python -m secvit_jax.predict workdirs/seg_demo --output_dir=out scene.jpg

CHECKPOINT is a converted checkpoint or a training workdir (see `secvit_jax.load_model`): its
model.json says which model to build, the size it evaluates at (the release's evaluation transform
of `image_size`) and the class names. A classifier prints the top classes of each image with their
probabilities (`--json`: one JSON document instead). Names: those model.json records (a folder's
class directories, the digits' '0'..'9'), shown as ImageNet's words where they are ImageNet
synsets; ImageNet's for a 1000-class checkpoint that records none (a converted release
checkpoint); else the class indices. A segmenter writes, per image, the colour-coded label map
over the image (`<name>_segmentation.png`, ADE20K's palette for ADE20K) and the label map itself
(`<name>_labels.png`, a palette PNG of class indices) into --output_dir, at the image's size, and
prints the classes that cover most of it. A detector lists each image's boxes (class, score, box
in the image's pixels) and draws them with their class names and scores into
--output_dir/<name>_detections.png:

    python -m secvit_jax.predict workdirs/det_demo scene.png --min_score 0.5 --output_dir pictures

Images are decoded with PIL (any format it reads: JPEG, PNG, GIF, TIFF, BMP, WebP, ...; turned
upright by their EXIF orientation, first frame of an animation, RGB), then resized, cropped and
normalized exactly as the input pipeline's evaluation (a classifier's: the central crop; a
segmenter's: the whole image resized to fit its evaluation scale, scored at the image's own size; a
detector's: resized to fit its `max_size` on its canvas). A file that is not an image is a one-line
error naming it, before any model is loaded.

How a model's outputs become results and how those are shown is its task's (`tasks.TASKS`, keyed
by model.json's task: `prepare_images`, `predict`, `show` of `tasks.base.Task`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

import numpy as np
from PIL import Image
from PIL import ImageOps

from secvit_jax import checkpoints
from secvit_jax import cli
from secvit_jax import quiet


class PredictError(Exception):
  """An input that cannot be used: the message is one line naming it."""


# ------------------------------------------------------------------------------------------------
# Images.
# ------------------------------------------------------------------------------------------------


def read_image(path: str) -> np.ndarray:
  """The image file at `path` as uint8 (H, W, 3) RGB, upright by its EXIF orientation.

  Raises:
    PredictError: naming `path` when it is missing or not an image PIL can decode.
  """
  try:
    with Image.open(path) as image:
      image = ImageOps.exif_transpose(image)  # Also loads (decodes) it.
      return np.asarray(image.convert('RGB'))
  except FileNotFoundError:
    raise PredictError(f'{path}: no such file') from None
  except IsADirectoryError:
    raise PredictError(f'{path}: a directory, not an image') from None
  except (Image.UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
    reason = str(error).replace(repr(path), '').replace(str(path), '').strip(' :') or 'corrupt'
    raise PredictError(f'{path}: not an image PIL can read ({reason})') from None


# ------------------------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------------------------


def read_info(checkpoint: str, step: int | None) -> checkpoints.ModelInfo:
  """The checkpoint's ModelInfo; PredictError (one line) when there is none or it is broken."""
  try:
    return checkpoints.read_model_info(checkpoint, step=step)
  except (FileNotFoundError, ValueError) as error:
    raise PredictError(str(error)) from None


def load(checkpoint: str, step: int | None, ema: bool) -> tuple[Any, Any]:
  """`tasks.load_model`, with its errors as PredictError."""
  from secvit_jax import tasks  # pylint: disable=g-import-not-at-top  (after the quiet start)
  try:
    return tasks.load_model(checkpoint, step=step, ema=ema)
  except (FileNotFoundError, ValueError) as error:
    raise PredictError(str(error)) from None


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
  """CHECKPOINT, --step and --ema: shared with `secvit_jax.visualize`."""
  parser.add_argument('checkpoint',
                      help='a converted checkpoint or a training workdir (with its model.json)')
  parser.add_argument('--step', type=int,
                      help='with a workdir: the checkpoint of this step (default: the newest)')
  parser.add_argument('--ema', action='store_true',
                      help='with a workdir: the exponential moving average of the weights')


def main(argv: Sequence[str] | None = None) -> int:
  quiet.silence_startup_noise()
  parser = argparse.ArgumentParser(
      prog=cli.program_name('secvit_jax.predict'), description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  add_checkpoint_arguments(parser)
  parser.add_argument('images', nargs='+', metavar='IMAGE', help='image files')
  parser.add_argument('--top', type=int, default=5, help='classes shown per image (default: 5)')
  parser.add_argument('--output_dir', default='.',
                      help='where a segmenter or a detector writes its pictures (default: the '
                      'current directory)')
  parser.add_argument('--batch_size', type=int, default=16,
                      help='images per forward pass (default: 16)')
  parser.add_argument('--json', action='store_true', help='print one JSON document instead')
  parser.add_argument('--min_score', type=float, default=0.3,
                      help='detection: the lowest score listed and drawn (default: 0.3)')
  options = parser.parse_args(argv)
  if options.top < 1 or options.batch_size < 1:
    parser.error('--top and --batch_size must be positive')
  from secvit_jax import tasks  # pylint: disable=g-import-not-at-top  (after the quiet start)
  try:
    info = read_info(options.checkpoint, options.step)
    if info.task not in tasks.TASKS:
      raise PredictError(f'{options.checkpoint}: predict does not know {info.task!r} models; it '
                         f'knows {sorted(tasks.TASKS)}')
    pixels = [read_image(path) for path in options.images]  # Every file checked before loading.
    model, variables = load(options.checkpoint, options.step, options.ema)
  except PredictError as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  task = tasks.TASKS[info.task]
  images, seen = task.prepare_images(pixels, info)
  print(f'{options.checkpoint}: {info.variant or "SecViT"}, {info.num_classes} classes, {seen}',
        file=sys.stderr)
  results = task.predict(model, variables, info, images, options)
  if options.json:
    document = {'checkpoint': options.checkpoint, 'task': info.task, 'variant': info.variant,
                'image_size': info.image_size,
                'results': [{'image': path, **result}
                            for path, result in zip(options.images, results)]}
    print(json.dumps(document, indent=2))
  else:
    print('\n\n'.join(task.show(path, result, options)
                      for path, result in zip(options.images, results)))
  return 0


if __name__ == '__main__':
  sys.exit(main())
