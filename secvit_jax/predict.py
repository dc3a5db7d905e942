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
normalized exactly as the input pipeline's evaluation (a segmenter's: the whole image resized to
fit its evaluation scale, scored at the image's own size). A file that is not an image is a one-line
error naming it, before any model is loaded.

How a model's outputs become results and how those are shown is per task (`TASKS`, keyed by
model.json's task): a task adds its entry there.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import importlib.resources
import json
import os
import sys
from typing import Any, Callable, Sequence

import jax
import numpy as np
from PIL import Image
from PIL import ImageOps

from secvit_jax import checkpoints
from secvit_jax import cli
from secvit_jax import quiet

IMAGENET_CLASSES_FILE = 'assets/imagenet2012_classes.tsv'
IMAGENET_NUM_CLASSES = 1000


class PredictError(Exception):
  """An input that cannot be used: the message is one line naming it."""


# ------------------------------------------------------------------------------------------------
# Class names.
# ------------------------------------------------------------------------------------------------


@functools.cache
def imagenet_classes() -> tuple[tuple[str, str], ...]:
  """ImageNet-1k's (synset, lemmas) in TFDS's label order, e.g. ('n01440764', 'tench, Tinca
  tinca'): 1000 pairs read from the package data (see secvit_jax/assets/README.md)."""
  text = importlib.resources.files('secvit_jax').joinpath(IMAGENET_CLASSES_FILE).read_text()
  return tuple(tuple(line.split('\t')) for line in text.splitlines())


@dataclasses.dataclass(frozen=True)
class ClassName:
  label: str  # As the checkpoint knows the class: its recorded name (an ImageNet synset...).
  name: str  # For people: ImageNet's first lemma, or the label.
  description: str  # Every name known for it (ImageNet's lemmas), or the label.


def class_names(info: checkpoints.ModelInfo) -> list[ClassName]:
  """A `ClassName` per class of the checkpoint `info` describes (see the module doc)."""
  lemmas = dict(imagenet_classes())
  if info.class_names is not None:
    labels = list(info.class_names)
  elif info.num_classes == IMAGENET_NUM_CLASSES:
    labels = [synset for synset, _ in imagenet_classes()]
  else:
    labels = [str(index) for index in range(info.num_classes)]
  descriptions = [lemmas.get(label, label) for label in labels]
  names = [description.split(', ')[0] for description in descriptions]
  counts = collections.Counter(names)
  repeated = {name for name, count in counts.items() if count > 1}  # ImageNet's two cranes...
  return [ClassName(label, f'{name} ({label})' if name in repeated and name != label else name,
                    description) for label, name, description in zip(labels, names, descriptions)]


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


def prepare_image(image: np.ndarray, size: int | tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """An image as the model sees it.

  Args:
    image: uint8 (H, W, 3).
    size: S, the evaluation transform of a model trained at S×S (the shorter side resized to
      S·256/224, the central S×S crop: `data.classification.eval_crop`); or (height, width) to
      resize the whole image to.

  Returns:
    (view, inputs): the uint8 (h, w, 3) pixels the model sees and the float32 (h, w, 3)
    normalized model input.
  """
  # TensorFlow's ops, imported here: the commands load TensorFlow after their quiet start-up.
  # pylint: disable=g-import-not-at-top
  from secvit_jax.data import classification as classification_data
  from secvit_jax.data import ops
  # pylint: enable=g-import-not-at-top
  if isinstance(size, int):
    view = classification_data.eval_crop(image, size)
  else:
    view = ops.resize_bicubic(image, size[0], size[1], pil_rounding=True)
  return np.asarray(view), np.asarray(ops.normalize(view))


# ------------------------------------------------------------------------------------------------
# Tasks: from the model's outputs to results, and from results to text.
# ------------------------------------------------------------------------------------------------


def prepare_batch(pixels: list[np.ndarray],
                  info: checkpoints.ModelInfo) -> tuple[np.ndarray, str]:
  """float32 (B, S, S, 3): the images as a classifier of `info` is evaluated on them."""
  return (np.stack([prepare_image(image, info.image_size)[1] for image in pixels]),
          f'evaluated at {info.image_size}×{info.image_size}')


@dataclasses.dataclass(frozen=True)
class Task:
  """How `predict` runs one task's model and shows its results.

  predict: (model, variables, info, prepared images, options) -> one JSON-able result per image
    (`options.images` are their paths).
  show: (image path, result, options) -> text for people (a task that draws pictures writes them
    here and says where).
  prepare: (decoded uint8 (H, W, 3) images, info) -> (the images `predict` takes, what the
    model sees, for the log).
  """
  predict: Callable[..., list[dict[str, Any]]]
  show: Callable[[str, dict[str, Any], argparse.Namespace], str]
  prepare: Callable[[list[np.ndarray], checkpoints.ModelInfo], tuple[Any, str]] = prepare_batch


def predict_classes(model: Any, variables: Any, info: checkpoints.ModelInfo, images: np.ndarray,
                    options: argparse.Namespace) -> list[dict[str, Any]]:
  """The `options.top` most probable classes per image: [{'top': [{'class', 'label', 'name',
  'description', 'probability'}, ...]}, ...]."""
  names = class_names(info)
  logits = np.asarray(_batched_apply(model, variables, images, options.batch_size))
  probabilities = np.exp(logits - logits.max(-1, keepdims=True))
  probabilities /= probabilities.sum(-1, keepdims=True)
  top = min(options.top, info.num_classes)
  results = []
  for row in probabilities:
    best = np.argsort(-row, kind='stable')[:top]
    results.append({'top': [
        {'class': int(index), **dataclasses.asdict(names[index]),
         'probability': float(row[index])} for index in best]})
  return results


def show_classes(path: str, result: dict[str, Any], options: argparse.Namespace) -> str:
  """A small table: rank, probability, name (and the label where the name does not show it)."""
  del options
  lines = [path, '  rank  probability  class']
  for rank, entry in enumerate(result['top'], start=1):
    label = f'  [{entry["label"]}]' if entry['label'] not in entry['name'] else ''
    lines.append(f'  {rank:>4}  {100 * entry["probability"]:10.2f}%  {entry["name"]}{label}')
  return '\n'.join(lines)


def predict_label_maps(model: Any, variables: Any, info: checkpoints.ModelInfo,
                       images: list[np.ndarray], options: argparse.Namespace
                       ) -> list[dict[str, Any]]:
  """Each image's label map at its own size, written to options.output_dir as
  <name>_segmentation.png (over the image) and <name>_labels.png; results: {'overlay',
  'label_map' (the files), 'classes': [{'class', 'name', 'fraction'}, ...] by decreasing area}."""
  # TensorFlow's ops, imported here (see prepare_image).
  # pylint: disable=g-import-not-at-top
  from secvit_jax.data import segmentation as segmentation_data
  from secvit_jax.tasks import segmentation
  # pylint: enable=g-import-not-at-top
  names = list(info.class_names or [str(index) for index in range(info.num_classes)])
  palette = segmentation.class_palette(names)
  scale = info.task_settings['eval_scale']
  classes_of = jax.jit(
      lambda v, x, height, width: segmentation.classes_at_size(
          segmentation.heads.resize_bilinear(model.apply(v, x[None])['logits'], *x.shape[:2])[0],
          height, width), static_argnums=(2, 3))
  os.makedirs(options.output_dir, exist_ok=True)
  taken = collections.Counter()
  results = []
  for path, image in zip(options.images, images):
    height, width = image.shape[:2]
    size = segmentation_data.rescaled_size(height, width, scale)
    inputs = np.asarray(segmentation_data.eval_image(image, size))
    classes = np.asarray(classes_of(variables, inputs, height, width))
    stem = os.path.splitext(os.path.basename(path))[0]
    taken[stem] += 1
    if taken[stem] > 1:  # Images of the same name from other folders.
      stem = f'{stem}_{taken[stem]}'
    overlay = os.path.join(options.output_dir, f'{stem}_segmentation.png')
    label_map = os.path.join(options.output_dir, f'{stem}_labels.png')
    Image.fromarray(segmentation.render_label_map(image, classes, palette)).save(overlay)
    segmentation.label_png(classes, palette, reduce_zero_label=False).save(label_map)
    counts = np.bincount(classes.ravel(), minlength=info.num_classes)
    order = np.argsort(-counts, kind='stable')[:options.top]
    results.append({'overlay': overlay, 'label_map': label_map, 'classes': [
        {'class': int(index), 'name': names[index], 'fraction': float(counts[index] / classes.size)}
        for index in order if counts[index]]})
    if len(images) > 1:
      print(f'{len(results)}/{len(images)} images', file=sys.stderr)
  return results


def show_label_maps(path: str, result: dict[str, Any], options: argparse.Namespace) -> str:
  """Where the pictures went, and the classes by the share of the image they cover."""
  del options
  lines = [f'{path} -> {result["overlay"]}, {result["label_map"]}', '  share  class']
  lines += [f'  {100 * entry["fraction"]:5.1f}%  {entry["name"]}' for entry in result['classes']]
  return '\n'.join(lines)


def prepare_segmentation(pixels: list[np.ndarray],
                         info: checkpoints.ModelInfo) -> tuple[list[np.ndarray], str]:
  """Segmentation resizes each image itself (`predict_label_maps`): the pixels as they are."""
  long_side, short_side = info.task_settings['eval_scale']
  return pixels, f'images resized to fit {long_side}×{short_side}'


def prepare_detection(pixels: list[np.ndarray],
                      info: checkpoints.ModelInfo) -> tuple[list[np.ndarray], str]:
  """Detection resizes each image itself (`predict_detections`): the pixels as they are."""
  long_side, short_side = info.task_settings['max_size']
  height, width = info.task_settings['canvas_size']
  return pixels, (f'images resized to fit {long_side}×{short_side} on a {height}×{width} '
                  'canvas')


def predict_detections(model: Any, variables: Any, info: checkpoints.ModelInfo,
                       images: list[np.ndarray],
                       options: argparse.Namespace) -> list[dict[str, Any]]:
  """Each image's detections with a score >= `options.min_score`, and its picture with them
  drawn, written to `options.output_dir`: [{'picture': path, 'detections': [{'class', 'name',
  'score', 'box': [x0, y0, x1, y1] in the image's pixels}, ...]}, ...], best first."""
  from secvit_jax.tasks import detection  # pylint: disable=g-import-not-at-top
  names = [entry.name for entry in class_names(info)]
  found = detection.predict(
      model, variables, detection.settings_from_fields(info.task_settings['retinanet']), images,
      canvas_size=info.task_settings['canvas_size'], max_size=info.task_settings['max_size'],
      batch_size=options.batch_size)
  os.makedirs(options.output_dir, exist_ok=True)
  results, used = [], collections.Counter()
  for path, image, detections in zip(options.images, images, found):
    stem = os.path.splitext(os.path.basename(path))[0]
    used[stem] += 1
    picture = os.path.join(options.output_dir,
                           f'{stem}{f"_{used[stem]}" if used[stem] > 1 else ""}_detections.png')
    detection.draw_detections(image, detections, names, options.min_score).save(picture)
    results.append({'picture': picture, 'detections': [
        {'class': int(label), 'name': names[label], 'score': float(score),
         'box': [round(float(v), 2) for v in box]}
        for box, score, label in zip(detections['boxes'], detections['scores'],
                                     detections['labels']) if score >= options.min_score]})
  return results


def show_detections(path: str, result: dict[str, Any], options: argparse.Namespace) -> str:
  """One line per detection: score, class, box; then where the picture is."""
  lines = [path]
  if result['detections']:
    lines.append('  score  class  box (x0, y0, x1, y1)')
    lines += [f'  {d["score"]:5.2f}  {d["name"]}  ({", ".join(f"{v:.1f}" for v in d["box"])})'
              for d in result['detections']]
  else:
    lines.append(f'  no detection scores {options.min_score} or more')
  lines.append(f'  drawn in {result["picture"]}')
  return '\n'.join(lines)


TASKS: dict[str, Task] = {
    checkpoints.CLASSIFICATION: Task(predict_classes, show_classes),
    checkpoints.SEGMENTATION: Task(predict_label_maps, show_label_maps, prepare_segmentation),
    checkpoints.DETECTION: Task(predict_detections, show_detections, prepare_detection),
}


def _batched_apply(model: Any, variables: Any, images: np.ndarray, batch_size: int) -> np.ndarray:
  """model.apply over `images` in batches of `batch_size` (the last padded: one compilation)."""
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  batch_size = min(batch_size, len(images))
  outputs = []
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    padding = batch_size - len(batch)
    padded = np.concatenate([batch, np.zeros((padding, *batch.shape[1:]), batch.dtype)])
    outputs.append(np.asarray(apply(variables, padded))[:len(batch)])
    if len(images) > batch_size:
      print(f'{start + len(batch)}/{len(images)} images', file=sys.stderr)
  return np.concatenate(outputs)


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
  """`load_model`, with its errors as PredictError."""
  try:
    return checkpoints.load_model(checkpoint, step=step, ema=ema)
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
  try:
    info = read_info(options.checkpoint, options.step)
    if info.task not in TASKS:
      raise PredictError(f'{options.checkpoint}: predict does not know {info.task!r} models; it '
                         f'knows {sorted(TASKS)}')
    pixels = [read_image(path) for path in options.images]  # Every file checked before loading.
    model, variables = load(options.checkpoint, options.step, options.ema)
  except PredictError as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  task = TASKS[info.task]
  images, seen = task.prepare(pixels, info)
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
