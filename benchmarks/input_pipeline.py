"""Host preprocessing throughput: images/s per CPU core of each training op and each recipe.

    python -m benchmarks.input_pipeline [--seconds 3] [--image-size 224] [--json OUT]

Ops: inputs are ImageNet-sized JPEGs (500×375 and 375×500, quality 95, 28-76 KB) made from
scikit-image's sample photographs, held in memory: file reading is not measured. Each op runs in
a tf.data map on one thread (private thread pool of 1, no intra-op parallelism), so a figure is
what one host core does. Ops after the crop get 224×224 crops made beforehand, so each row is
that op alone; 'train recipe' is the whole per-image transform of `default_input_config()`
(fused decode + random resized crop, flip, RandAugment, normalization, random erasing).

Recipes, against what one TPU v5e-8 host's chips consume: each training recipe's own data
(`Task.create_data` of its config) on a synthetic dataset in its real layout, written to a
temporary folder: ImageNet (an image folder of the JPEGs above), ADE20K (683×512 and 512×683
JPEGs, PNG label maps of weighted Voronoi regions of the 150 classes and "other"), COCO (640×480
and 480×640 JPEGs, 3-12 star-shaped polygon instances each, radii log-uniform in 5-200 pixels).
Its training share's examples are read once and held in memory; its per-example transform
(`HostData.train_input`: decoding, augmentation, label maps, boxes, Mask R-CNN's mask crops) runs
on one thread as the ops do. Beside each, the demand of a v5e-8 host: the compiled FLOPs per image
of the recipe's train step (benchmarks/results/tpu_*.json, compiled for v5e:2x4 by
`benchmarks.tpu_compile`; the model, head, input and remat the config sets) at `--utilisation` of
the chip's bf16 peak, times the host's 8 chips, and the host cores that rate takes at the measured
images per CPU-second, beside the host's 224 vCPUs.

`--end-to-end` also runs the real training pipeline (`ClassificationData.local_train_batches` on an
image folder of these JPEGs, all cores, tf.data autotuning) and prints its images/s.

`--resume` measures what resuming costs: the time to the first batch at step 0 and deep inside
an epoch, for an image folder and for a TFDS dataset prepared in a temporary directory.

'img/s per core' divides by the CPU time the process used, which keeps it meaningful on a shared,
loaded machine; 'img/s seen' is the wall-clock rate of the same runs. Each is the best of
--repeats runs.
"""

from __future__ import annotations

from secvit_jax import quiet

if __name__ == '__main__':  # First: before TensorFlow loads (secvit_jax/quiet.py).
  quiet.silence_startup_noise()

# pylint: disable=g-import-not-at-top,wrong-import-position,g-bad-import-order
import argparse
import glob
import importlib
import io
import json
import os
import shlex
import sys
import tempfile
import time
from typing import Any, Callable

import ml_collections
import numpy as np
from PIL import Image
import skimage.data

from benchmarks import common
from configs import common as recipe
from secvit_jax import tasks
from secvit_jax.data import classification as data_lib
from secvit_jax.data import detection as detection_data
from secvit_jax.data import ops
from secvit_jax.data import randaugment
from secvit_jax.data import sources

import tensorflow as tf  # pylint: disable=g-bad-import-order

PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket')
TARGET_IMG_PER_S = 2000  # One accelerator training secvit_s.
IMAGENET_SIZES = ((500, 375), (375, 500))  # (width, height), as ImageNet's most common.
ADE20K_SIZES = ((683, 512), (512, 683))
COCO_SIZES = ((640, 480), (480, 640))
ADE20K_LABEL_VALUES = 151  # 0 "other" (ignored), 1..150 the classes.
# The demand side: a Cloud TPU v5e chip's bf16 peak (docs.cloud.google.com/tpu/docs/v5e), and a
# v5e-8 host (ct5lp-hightpu-8t): its chips and vCPUs.
V5E_PEAK_BF16_FLOP_PER_S = 197e12
V5E8_CHIPS = 8
V5E8_HOST_VCPUS = 224


def make_jpegs(count: int, quality: int = 95,
               sizes: tuple[tuple[int, int], ...] = IMAGENET_SIZES) -> list[bytes]:
  """`count` distinct JPEGs: crops of the sample photos resized to each of `sizes` (width, height)
  in turn, some mirrored."""
  jpegs = []
  for i in range(count):
    photo = Image.fromarray(getattr(skimage.data, PHOTOS[i % len(PHOTOS)])())
    width, height = sizes[(i // len(PHOTOS)) % len(sizes)]
    # A crop of the photo with the target's aspect ratio, shifted a little per image.
    scale = min(photo.width / width, photo.height / height) * (0.8 + 0.2 * ((i * 7) % 5) / 4)
    crop_w, crop_h = int(width * scale), int(height * scale)
    left = (photo.width - crop_w) * ((i * 3) % 4) // 3
    top = (photo.height - crop_h) * ((i * 5) % 3) // 2
    image = photo.crop((left, top, left + crop_w, top + crop_h)).resize((width, height),
                                                                        Image.BICUBIC)
    if (i // (2 * len(PHOTOS))) % 2:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
    buffer = io.BytesIO()
    image.convert('RGB').save(buffer, format='JPEG', quality=quality)
    jpegs.append(buffer.getvalue())
  return jpegs


def jpeg_size(jpeg: bytes) -> tuple[int, int]:
  """(width, height) of a JPEG."""
  return Image.open(io.BytesIO(jpeg)).size


def voronoi_label_map(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
  """uint8 (height, width): an ADE20K-like label map, 8-40 regions of weighted Voronoi cells
  (sizes from a few hundred pixels to much of the image), each one of the 150 classes (values
  1..150) or, one in ten, "other" (0)."""
  regions = int(rng.integers(8, 41))
  centres = rng.uniform([0, 0], [width, height], (regions, 2))
  weights = rng.exponential(0.02 * width * height, regions)
  values = rng.integers(1, ADE20K_LABEL_VALUES, regions)
  values[rng.uniform(size=regions) < 0.1] = 0
  ys, xs = np.mgrid[:height, :width]
  distances = ((xs[..., None] - centres[:, 0]) ** 2 + (ys[..., None] - centres[:, 1]) ** 2
               - weights)
  return values[np.argmin(distances, axis=-1)].astype(np.uint8)


def png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


def write_file(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)


def write_imagenet(root: str, count: int) -> dict[str, Any]:
  """An image folder of `count` ImageNet-sized JPEGs per split; the config fields that read it."""
  write_folder(root, make_jpegs(count), count)
  return {'dataset': 'folder', 'data_dir': root, 'train_split': 'train', 'eval_split': 'val'}


def write_ade20k(root: str, count: int) -> dict[str, Any]:
  """ADE20K's layout (images/<split>/*.jpg, annotations/<split>/*.png) with `count` ADE20K-sized
  JPEGs and label maps (`voronoi_label_map`) per split; the config fields that read it."""
  rng = np.random.default_rng(0)
  for i, jpeg in enumerate(make_jpegs(count, sizes=ADE20K_SIZES)):
    label = png(voronoi_label_map(*jpeg_size(jpeg), rng))
    for split in ('training', 'validation'):
      write_file(os.path.join(root, 'images', split, f'{i:05d}.jpg'), jpeg)
      write_file(os.path.join(root, 'annotations', split, f'{i:05d}.png'), label)
  return {'dataset': 'ade20k', 'data_dir': root}


def random_polygon(width: int, height: int, rng: np.random.Generator) -> list[float]:
  """A star-shaped polygon of 12-40 points inside the image, its radius log-uniform in 5-200
  pixels (COCO's objects: small to large), flat x0, y0, x1, y1, ..."""
  points = int(rng.integers(12, 41))
  radius = float(np.exp(rng.uniform(np.log(5.0), np.log(200.0))))
  centre = rng.uniform([radius, radius], [max(width - radius, radius + 1),
                                          max(height - radius, radius + 1)])
  angles = np.sort(rng.uniform(0, 2 * np.pi, points))
  radii = radius * rng.uniform(0.5, 1.0, points)
  xy = centre + np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=-1)
  xy = np.clip(xy, 0, [width - 1, height - 1])
  return [round(float(v), 2) for v in xy.reshape(-1)]


def write_coco(root: str, count: int) -> dict[str, Any]:
  """COCO's layout (annotations/instances_{train,val}2017.json, train2017/, val2017/) with
  `count` COCO-sized JPEGs per split, each with 3-12 polygon instances (`random_polygon`) of the
  80 classes; the config fields that read it."""
  rng = np.random.default_rng(0)
  images, annotations = [], []
  for i, jpeg in enumerate(make_jpegs(count, sizes=COCO_SIZES)):
    width, height = jpeg_size(jpeg)
    name = f'{i:012d}.jpg'
    images.append({'id': i + 1, 'file_name': name, 'width': width, 'height': height})
    for _ in range(int(rng.integers(3, 13))):
      polygon = random_polygon(width, height, rng)
      xs, ys = polygon[0::2], polygon[1::2]
      x0, y0 = min(xs), min(ys)
      area = 0.5 * abs(float(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))
      annotations.append({
          'id': len(annotations) + 1, 'image_id': i + 1, 'iscrowd': 0, 'area': area,
          'category_id': int(rng.choice(detection_data.COCO_CATEGORY_IDS)),
          'bbox': [x0, y0, max(xs) - x0, max(ys) - y0], 'segmentation': [polygon]})
    for folder in ('train2017', 'val2017'):
      write_file(os.path.join(root, folder, name), jpeg)
  categories = [{'id': c, 'name': str(c)} for c in detection_data.COCO_CATEGORY_IDS]
  for split in ('train', 'val'):
    write_file(os.path.join(root, 'annotations', f'instances_{split}2017.json'), json.dumps(
        {'images': images, 'annotations': annotations, 'categories': categories}).encode())
  return {'dataset': 'coco', 'data_dir': root}


# (row name, config module, writer of its synthetic dataset).
RECIPES = (
    ('ImageNet (secvit_s)', 'secvit_s', write_imagenet),
    ('ADE20K (UperNet secvit_s)', 'ade20k_upernet_secvit_s', write_ade20k),
    ('COCO (RetinaNet secvit_s)', 'coco_retinanet_secvit_s', write_coco),
    ('COCO (Mask R-CNN secvit_s 1x)', 'coco_mask_rcnn_secvit_s_1x', write_coco),
    ('COCO (Mask R-CNN secvit_s 3x)', 'coco_mask_rcnn_secvit_s_3x', write_coco),
)


def single_core_options() -> tf.data.Options:
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  options.autotune.enabled = False
  return options


def images_per_second(inputs: tf.data.Dataset, fn: Callable[[Any, tf.Tensor], Any],
                      seconds: float, repeats: int) -> tuple[float, float]:
  """`fn(input, seed)` on one thread over the (finite) `inputs`, repeated: (images per
  CPU-second, images per wall-clock second).

  The first figure divides by the CPU time the process used, so it is what one core does when
  the op has it to itself, even on a loaded machine; the second is what the run saw. Each is the
  best of `repeats` runs of about `seconds`.
  """
  def seeded(index, x):
    return fn(x, tf.stack([index, tf.constant(7, tf.int64)]))

  ds = inputs.repeat().enumerate()
  ds = ds.map(seeded, num_parallel_calls=1).with_options(single_core_options())
  iterator = iter(ds)
  next(iterator)  # Builds the pipeline and runs the op once.
  per_cpu_second, per_second = 0.0, 0.0
  for _ in range(repeats):
    count, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
      next(iterator)
      count += 1
    per_cpu_second = max(per_cpu_second, count / (time.process_time() - cpu_start))
    per_second = max(per_second, count / (time.perf_counter() - start))
  return per_cpu_second, per_second


def recipe_input() -> ml_collections.ConfigDict:
  """The release's training preprocessing, `config.input` of the ImageNet configs."""
  return recipe.recipe('secvit_s').input


def op_benchmarks(jpegs: list[bytes], size: int, seconds: float, repeats: int):
  """(name, images per CPU-second, images per second) of each op, the recipe and evaluation."""
  data = tf.constant(jpegs)
  crops = tf.stack([ops.decode_and_random_resized_crop(data[i], tf.constant([i, 0], tf.int64),
                                                       size) for i in range(len(jpegs))])
  normalized = ops.normalize(crops)
  augment = randaugment.parse_randaugment('rand-m9-mstd0.5-inc1')
  train_preprocess = data_lib.train_preprocess_fn(recipe_input(), size, encoded=True)
  cases = [
      ('decode JPEG (fast DCT)', data, lambda x, s: ops.decode_image(x)),
      ('decode JPEG (accurate DCT)', data, lambda x, s: ops.decode_image(x, accurate=True)),
      ('decode + random resized crop, unfused', data,
       lambda x, s: ops.random_resized_crop(ops.decode_image(x), s, size)),
      ('decode + random resized crop, fused', data,
       lambda x, s: ops.decode_and_random_resized_crop(x, s, size)),
      ('horizontal flip', crops, ops.random_flip_left_right),
      ('RandAugment rand-m9-mstd0.5-inc1', crops,
       lambda x, s: randaugment.rand_augment(x, s, augment)),
      ('normalize', crops, lambda x, s: ops.normalize(x)),
      ('random erasing p=0.25', normalized, lambda x, s: ops.random_erasing(x, s, 0.25)),
      ('train recipe (all of the above, fused crop)', data,
       lambda x, s: train_preprocess({'image': x, 'label': 0}, s)['image']),
      ('eval: preprocess_for_eval', data, lambda x, s: data_lib.preprocess_for_eval(x, size)),
  ]
  return [(name, *images_per_second(tf.data.Dataset.from_tensor_slices(inputs), fn, seconds,
                                    repeats))
          for name, inputs, fn in cases]


def compiled_input(config: ml_collections.ConfigDict) -> tuple[str | None, tuple[int, int]]:
  """(the head or detector a TPU compile result names, None for a classifier; the (H, W) input)
  of `config`'s train step."""
  if config.task == 'segmentation':
    return config.head.name, tuple(config.input.crop_size)
  if config.task == 'detection':
    return config.detector, tuple(config.input.canvas_size)
  return None, (config.image_size, config.image_size)


def tpu_compile_result(results_dir: str, config: ml_collections.ConfigDict
                       ) -> tuple[str, dict[str, Any]]:
  """(file name, contents) of the tpu_*.json of `config`'s train step on v5e chips: its model,
  head, input and remat, a compile that fits and counted its FLOPs.

  Raises:
    FileNotFoundError: naming the step that `benchmarks.tpu_compile` has not compiled.
  """
  head, size = compiled_input(config)
  remat = bool(config.model.remat)
  for path in sorted(glob.glob(os.path.join(results_dir, 'tpu_*.json'))):
    with open(path) as f:
      result = json.load(f)
    # Results from before 'head' and 'input' were recorded are classifiers at 224×224.
    if (result['topology'].startswith('v5e') and result['model'] == config.model.name
        and result.get('head') == head and tuple(result.get('input', (224, 224))) == size
        and result['remat'] == remat and result['fits'] and result['flops_per_step']):
      return os.path.basename(path), result
  raise FileNotFoundError(
      f'no tpu_*.json in {results_dir} of {config.model.name} {head or "classifier"} at '
      f'{size[0]}×{size[1]} (remat {remat}) on v5e that fits and counted its FLOPs: run '
      'python -m benchmarks.tpu_compile for it')


def recipe_images_per_second(config: ml_collections.ConfigDict,
                             write: Callable[[str, int], dict[str, Any]], count: int,
                             seconds: float, repeats: int) -> tuple[float, float]:
  """`config`'s per-example training transform (`HostData.train_input`) on one thread, over the
  `count` training examples that `write` puts in a temporary folder (read once, then held in
  memory): (images per CPU-second, images per wall-clock second), as `images_per_second`."""
  with tempfile.TemporaryDirectory() as root:
    config = config.copy_and_resolve_references()
    config.update(write(root, count))
    data = tasks.get_task_class(config.task).create_data(config)
    train = data.train_input(0, 1)
    examples = train.share.elements(None, 0).map(lambda position, features: features).cache()
    for _ in examples:  # Fills the cache: the timed runs read no file.
      pass
    return images_per_second(examples, train.preprocess, seconds, repeats)


def recipe_rows(names: list[str], results_dir: str, utilisation: float, count: int,
                seconds: float, repeats: int) -> list[dict[str, Any]]:
  """Supply and demand of each recipe of `RECIPES` whose config module is in `names`."""
  rows = []
  for name, module, write in RECIPES:
    if module not in names:
      continue
    config = importlib.import_module(f'configs.{module}').get_config()
    per_cpu, wall = recipe_images_per_second(config, write, count, seconds, repeats)
    result_file, result = tpu_compile_result(results_dir, config)
    gflop = result['flops_per_step'] / result['global_batch'] / 1e9
    host_rate = utilisation * V5E_PEAK_BF16_FLOP_PER_S / (gflop * 1e9) * V5E8_CHIPS
    cores = host_rate / per_cpu
    rows.append({'recipe': name, 'config': module, 'img_per_cpu_s': per_cpu,
                 'ms_per_image': 1000.0 / per_cpu, 'img_per_s_wall': wall,
                 'gflop_per_image': gflop, 'tpu_result': result_file,
                 'host_img_per_s': host_rate, 'host_cores_needed': cores,
                 'host_vcpus': V5E8_HOST_VCPUS, 'starves': cores > V5E8_HOST_VCPUS})
  return rows


RECIPE_HEADERS = ('recipe', 'img per CPU-s', 'ms per image', 'GFLOP/img (TPU step)',
                  'img/s a v5e-8 host consumes', 'host cores needed', 'host vCPUs', 'starves?')


def recipe_table_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
  """`RECIPE_HEADERS`' cells of `recipe_rows`' rows (also the README's)."""
  return [[r['recipe'], r['img_per_cpu_s'], r['ms_per_image'], r['gflop_per_image'],
           r['host_img_per_s'], r['host_cores_needed'], r['host_vcpus'],
           '**yes**' if r['starves'] else 'no'] for r in rows]


def write_folder(root: str, jpegs: list[bytes], count: int) -> None:
  """ROOT/{train,val}/<class>/ with `count` files each, copies of the JPEGs, over 10 classes."""
  for split in ('train', 'val'):
    for i in range(count):
      directory = os.path.join(root, split, f'c{i % 10}')
      os.makedirs(directory, exist_ok=True)
      with open(os.path.join(directory, f'{i:05d}.JPEG'), 'wb') as f:
        f.write(jpegs[i % len(jpegs)])


def end_to_end(root: str, size: int, batch: int, seconds: float) -> tuple[float, float]:
  """The real training pipeline on an image folder, all host cores: (images per CPU-second,
  images per second)."""
  config = ml_collections.ConfigDict({
      'dataset': 'folder', 'data_dir': root, 'image_size': size, 'batch_size': batch,
      'seed': 0, 'input': recipe_input()})
  batches = data_lib.ClassificationData(config).local_train_batches(0, 1)
  for _ in range(3):
    next(batches)  # Warm-up: tracing, autotuning.
  count, start, cpu_start = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - start < seconds:
    count += next(batches)['image'].shape[0]
  return count / (time.process_time() - cpu_start), count / (time.perf_counter() - start)


def time_to_first_batch(config: ml_collections.ConfigDict, start_step: int) -> float:
  start = time.perf_counter()
  batches = data_lib.ClassificationData(config).local_train_batches(0, 1, start_step)
  next(batches)
  return time.perf_counter() - start


def resume_benchmarks(root: str, jpegs: list[bytes], size: int, batch: int):
  """(source, examples, step, s to the first batch at step 0, s to it at `step`), best of 3.

  Digits and folders start any step at once; a TFDS stream reads (without decoding) the records
  of the epoch before the step: the difference of the two times is that cost.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  icfg = recipe_input()
  # Resumption, not augmentation, is timed; a shuffle buffer much smaller than the epoch, as with
  # ImageNet's (10k of ~1.28M / processes records).
  icfg.update(randaugment='', repeated_augmentations=1, shuffle_buffer=256)
  num_train = len(sources.list_image_folder(root, 'train')[0])
  tfds_dir = os.path.join(root, 'tfds')
  features = tfds.features.FeaturesDict({'image': tfds.features.Image(encoding_format='jpeg'),
                                         'label': tfds.features.ClassLabel(num_classes=10)})

  def examples(count):
    return [(i, {'image': io.BytesIO(jpegs[i % len(jpegs)]), 'label': i % 10})
            for i in range(count)]

  tfds.dataset_builders.store_as_tfds_dataset(
      name='benchmark_jpegs', version='1.0.0', features=features, data_dir=tfds_dir,
      split_datasets={'train': examples(num_train), 'test': examples(batch)})
  rows = []
  step = num_train // batch - 1  # The last step of the first epoch.
  for source, fields in (('folder', {'dataset': 'folder', 'data_dir': root}),
                         ('tfds', {'dataset': 'benchmark_jpegs', 'data_dir': tfds_dir})):
    config = ml_collections.ConfigDict({'image_size': size, 'batch_size': batch, 'seed': 0,
                                        'input': icfg, **fields})
    time_to_first_batch(config, 0)  # Warm-up.
    first = min(time_to_first_batch(config, 0) for _ in range(3))
    resumed = min(time_to_first_batch(config, step) for _ in range(3))
    rows.append((source, num_train, step, first, resumed))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog='\n'.join(__doc__.splitlines()[1:]))
  parser.add_argument('--image-size', type=int, default=224,
                      help='height and width of the preprocessed images')
  parser.add_argument('--num-images', type=int, default=16,
                      help='distinct JPEGs (and examples of each recipe\'s dataset)')
  parser.add_argument('--seconds', type=float, default=3.0, help='length of one timed run')
  parser.add_argument('--repeats', type=int, default=3, help='timed runs per op (best kept)')
  parser.add_argument('--ops', action=argparse.BooleanOptionalAction, default=True,
                      help='time the ImageNet recipe op by op')
  modules = [module for _, module, _ in RECIPES]
  parser.add_argument('--recipes', nargs='*', default=modules, choices=modules, metavar='CONFIG',
                      help=f'config modules of the recipes to time, of {", ".join(modules)} '
                      '(default all; the flag alone: none)')
  parser.add_argument('--utilisation', type=float, default=0.5,
                      help="fraction of the v5e chip's bf16 peak the train steps reach")
  parser.add_argument('--results', default='benchmarks/results',
                      help='directory of the tpu_*.json compile results (FLOPs per step)')
  parser.add_argument('--end-to-end', action='store_true',
                      help='also time the real training pipeline on all cores')
  parser.add_argument('--resume', action='store_true', help='also time resumption')
  parser.add_argument('--resume-examples', type=int, default=4096,
                      help='training examples of the datasets --resume writes')
  parser.add_argument('--batch', type=int, default=128, help='batch of --end-to-end, --resume')
  common.add_output_flags(parser)
  args = parser.parse_args()

  jpegs = make_jpegs(args.num_images)
  sizes = [len(j) for j in jpegs]
  print(f'{len(jpegs)} JPEGs of 500×375 / 375×500, {min(sizes) // 1000}-{max(sizes) // 1000} KB; '
        f'{os.cpu_count()} host cores; one core per op\n')
  payload = {'image_size': args.image_size, 'jpeg_bytes': sizes}
  if args.ops:
    results = op_benchmarks(jpegs, args.image_size, args.seconds, args.repeats)
    rows = [(name, per_cpu, 1000.0 / per_cpu, TARGET_IMG_PER_S / per_cpu, wall)
            for name, per_cpu, wall in results]
    common.print_table(['op', 'img/s per core', 'ms per image',
                        f'cores for {TARGET_IMG_PER_S} img/s', 'img/s seen (wall clock)'], rows)
    payload['ops'] = [dict(zip(('op', 'img_per_s_per_core', 'ms_per_image', 'cores_for_2000',
                                'img_per_s_wall'), r)) for r in rows]
  if args.recipes:
    recipes = recipe_rows(args.recipes, args.results, args.utilisation, args.num_images,
                          args.seconds, args.repeats)
    print(f'\nRecipes on one core against a v5e-8 host ({V5E8_CHIPS} chips at '
          f'{args.utilisation:.0%} of {V5E_PEAK_BF16_FLOP_PER_S / 1e12:.0f} TFLOP/s bf16, '
          f'{V5E8_HOST_VCPUS} vCPUs):\n')
    common.print_table(RECIPE_HEADERS, recipe_table_rows(recipes))
    payload.update({
        'command': 'python -m benchmarks.input_pipeline ' + shlex.join(sys.argv[1:]),
        'utilisation': args.utilisation, 'peak_bf16_flop_per_s': V5E_PEAK_BF16_FLOP_PER_S,
        'chips_per_host': V5E8_CHIPS, 'num_images': args.num_images, 'recipes': recipes})
  if args.end_to_end or args.resume:
    with tempfile.TemporaryDirectory() as root:
      write_folder(root, jpegs, max(4 * args.batch, args.resume_examples if args.resume else 0))
      if args.end_to_end:
        per_cpu, wall = end_to_end(root, args.image_size, args.batch, 3 * args.seconds)
        print(f'\nend to end (image folder, full recipe, {os.cpu_count()} cores, tf.data '
              f'autotune): {per_cpu:.0f} img per CPU-second; {wall:.0f} img/s seen')
        payload['end_to_end'] = {'img_per_cpu_s': per_cpu, 'img_per_s_wall': wall}
      if args.resume:
        resume_rows = resume_benchmarks(root, jpegs, args.image_size, args.batch)
        print()
        common.print_table(['source', 'train examples', 'resume step', 's to batch 0',
                            's to batch at resume step'], resume_rows)
        payload['resume'] = [dict(zip(('source', 'examples', 'step', 'first_s', 'resume_s'), r))
                             for r in resume_rows]
  common.write_json(args.json, payload)


if __name__ == '__main__':
  main()
