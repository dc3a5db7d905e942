"""Host preprocessing throughput: images/s per CPU core of each training op and of the recipe.

    python -m benchmarks.input_pipeline [--seconds 3] [--image-size 224] [--json OUT]

Inputs are ImageNet-sized JPEGs (500×375 and 375×500, quality 95, 28-76 KB) made from
scikit-image's sample photographs, held in memory: file reading is not measured. Each op runs in
a tf.data map on one thread (private thread pool of 1, no intra-op parallelism), so a figure is
what one host core does. Ops after the crop get 224×224 crops made beforehand, so each row is
that op alone; 'train recipe' is the whole per-image transform of `default_input_config()`
(fused decode + random resized crop, flip, RandAugment, normalization, random erasing).

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
import io
import os
import tempfile
import time
from typing import Callable

import ml_collections
import numpy as np
from PIL import Image
import skimage.data

from benchmarks import common
from configs import common as recipe
from secvit_jax.data import classification as data_lib
from secvit_jax.data import ops
from secvit_jax.data import randaugment
from secvit_jax.data import sources

import tensorflow as tf  # pylint: disable=g-bad-import-order

PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket')
TARGET_IMG_PER_S = 2000  # One accelerator training secvit_s.


def make_jpegs(count: int, quality: int = 95) -> list[bytes]:
  """`count` distinct ImageNet-sized JPEGs: crops of the sample photos resized to 500×375 (or
  375×500), some mirrored."""
  jpegs = []
  for i in range(count):
    photo = Image.fromarray(getattr(skimage.data, PHOTOS[i % len(PHOTOS)])())
    width, height = (500, 375) if (i // len(PHOTOS)) % 2 == 0 else (375, 500)
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
    image.save(buffer, format='JPEG', quality=quality)
    jpegs.append(buffer.getvalue())
  return jpegs


def single_core_options() -> tf.data.Options:
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  options.autotune.enabled = False
  return options


def images_per_second(inputs: tf.Tensor, fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
                      seconds: float, repeats: int) -> tuple[float, float]:
  """`fn(input, seed)` on one thread: (images per CPU-second, images per wall-clock second).

  The first figure divides by the CPU time the process used, so it is what one core does when
  the op has it to itself, even on a loaded machine; the second is what the run saw. Each is the
  best of `repeats` runs of about `seconds`.
  """
  def seeded(index, x):
    return fn(x, tf.stack([index, tf.constant(7, tf.int64)]))

  ds = tf.data.Dataset.from_tensor_slices(inputs).repeat().enumerate()
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
  return [(name, *images_per_second(inputs, fn, seconds, repeats)) for name, inputs, fn in cases]


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
  parser.add_argument('--num-images', type=int, default=16, help='distinct JPEGs')
  parser.add_argument('--seconds', type=float, default=3.0, help='length of one timed run')
  parser.add_argument('--repeats', type=int, default=3, help='timed runs per op (best kept)')
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
  results = op_benchmarks(jpegs, args.image_size, args.seconds, args.repeats)
  rows = [(name, per_cpu, 1000.0 / per_cpu, TARGET_IMG_PER_S / per_cpu, wall)
          for name, per_cpu, wall in results]
  common.print_table(['op', 'img/s per core', 'ms per image', f'cores for {TARGET_IMG_PER_S} img/s',
                      'img/s seen (wall clock)'], rows)
  payload = {'image_size': args.image_size, 'jpeg_bytes': sizes, 'ops': [
      dict(zip(('op', 'img_per_s_per_core', 'ms_per_image', 'cores_for_2000', 'img_per_s_wall'), r))
      for r in rows]}
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
