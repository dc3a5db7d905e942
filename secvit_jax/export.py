"""Export for serving: a checkpoint as a TF SavedModel or an ONNX file, checked against JAX.

    secvit-export CHECKPOINT OUT --format=saved_model|onnx [--size HxW] [--with_preprocessing]
    python -m secvit_jax.export workdirs/demo --ema exported/demo_onnx --format=onnx

CHECKPOINT is anything `load_model` reads (a converted checkpoint, a workdir with --ema/--step).
The served function takes a batch of images of any size B (a dynamic batch dimension) at one
spatial size fixed at export (`--size`, default the checkpoint's: `image_size`² for classifiers
and segmenters, the canvas for detectors):
  images   float32 (B, H, W, 3), NHWC, normalized as the training pipeline's model input; or with
           --with_preprocessing uint8 (B, h, w, 3) of any h, w (one size per batch), which the
           graph resizes and normalizes as the task's evaluation does (its
           `serving_preprocess`).
and returns, per task (its `serving_outputs`, `tasks.base.Task`):
  classification  'logits' float32 (B, K)
  segmentation    'logits' float32 (B, H, W, K): per-pixel class logits at the input size
  detection       'boxes' float32 (B, D, 4) (x0, y0, x1, y1) in the input's pixels, 'scores'
                  float32 (B, D), 'classes' int32 (B, D), 'num_detections' int32 (B,): the first
                  num_detections of the D = max_detections slots are the detections, best first;
                  Mask R-CNN adds 'masks' float32 (B, D, 28, 28), each detection's mask
                  probabilities over its box (paste into the image, then >= 0.5).
With --with_preprocessing, the sizes are the uint8 image's: a segmenter's logits are resized to
(h, w), a detector's boxes are in the original image's pixels.

The graph is the XLA formulation of the model (`dwconv_impl` 'shift' for a SavedModel, 'xla', a
grouped convolution, for ONNX; attention 'einsum'; no native CPU kernel: no custom call). After
writing, the export is read back (TensorFlow loads the SavedModel, onnxruntime runs the ONNX file)
and run on random inputs at two batch sizes; its outputs must match JAX's (`check_outputs`), and
the figures go to OUT/export.json. Any failure (a bad checkpoint, an operation the converter
cannot express, a mismatch) is a one-line error; OUT is written in a staging directory and
renamed into place only once everything passed, so it never holds a partial export.

Formats:
  saved_model  OUT/ is a SavedModel with the signature 'serving_default' (input 'images'); the
               weights are its variables, the graph one XlaCallModule op holding the StableHLO
               module of `jax.export`. TensorFlow 2.21 reads StableHLO up to 1.13.7 while jax
               0.10.2 writes 1.15.0 and offers no option to choose: the module text is serialized
               again, for the version TensorFlow reports, by `jax.extend.mlir`, after each
               `stablehlo.composite` (e.g. erf's) is replaced by a call of its decomposition (what
               XLA runs anyway), since TensorFlow 2.21 cannot refine the shapes inside composites
               of a dynamic batch.
  onnx         OUT/model.onnx (opset of jax2onnx's choice), input 'images', by jax2onnx.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from secvit_jax import checkpoints
from secvit_jax import cli
from secvit_jax import cpu_kernels
from secvit_jax import files
from secvit_jax import quiet
from secvit_jax import serving
from secvit_jax import tasks

FORMATS = ('saved_model', 'onnx')
ONNX_FILE = 'model.onnx'
METADATA_FILE = 'export.json'
INPUT_NAME = 'images'
# The depthwise convolutions in each format: XLA runs 'shift' fastest on a CPU (model.py), and an
# ONNX grouped Conv is one operator where 'shift' would be k² slices (and a 7× longer conversion).
DWCONV_IMPL = {'saved_model': 'shift', 'onnx': 'xla'}
# The check at export: outputs within this fraction of the largest reference value.
RELATIVE_TOLERANCE = 1e-4
CHECK_BATCHES = (1, 3)


class ExportError(Exception):
  """A checkpoint, format or model that cannot be exported: the message is one line."""


# ------------------------------------------------------------------------------------------------
# The served function.
# ------------------------------------------------------------------------------------------------


def serving_function(model: Any, info: checkpoints.ModelInfo, size: tuple[int, int],
                     with_preprocessing: bool) -> Callable[[Any, jax.Array], serving.Outputs]:
  """(variables, images) -> outputs: the function an export serves (see the module doc), as the
  checkpoint's task (`tasks.TASKS`) defines it."""
  task = tasks.TASKS[info.task]

  def serve(variables: Any, images: jax.Array) -> serving.Outputs:
    if with_preprocessing:
      inputs, geometry = task.serving_preprocess(images, size, info)
      output_size = images.shape[1:3]
    else:
      inputs, geometry = images, serving.Geometry.identity(images)
      output_size = size
    return task.serving_outputs(model, variables, info, inputs, geometry, output_size)

  return serve


def input_spec(size: tuple[int, int], with_preprocessing: bool,
               names: str = 'b') -> jax.ShapeDtypeStruct:
  """The served input: (b, H, W, 3) float32, or (b, h, w, 3) uint8 with preprocessing, b (and
  h, w) symbolic dimensions named `names`, e.g. 'b' or 'B'."""
  if with_preprocessing:
    shape = jax.export.symbolic_shape(f'{names}, h, w, 3')
    return jax.ShapeDtypeStruct(shape, jnp.uint8)
  batch, = jax.export.symbolic_shape(names)
  return jax.ShapeDtypeStruct((batch, *size, 3), jnp.float32)


# ------------------------------------------------------------------------------------------------
# The formats.
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def xla_paths():
  """Traces inside use XLA's own operations, not `cpu_kernels`' custom calls."""
  previous = os.environ.get(cpu_kernels.DISABLE_ENV)
  os.environ[cpu_kernels.DISABLE_ENV] = '0'
  try:
    yield
  finally:
    if previous is None:
      del os.environ[cpu_kernels.DISABLE_ENV]
    else:
      os.environ[cpu_kernels.DISABLE_ENV] = previous


# `stablehlo.composite "name" %operands {attributes} : type`, the attributes holding
# `decomposition = @function` (and at most one level of nested braces).
_COMPOSITE = re.compile(r'stablehlo\.composite "[^"]*" ([^{]*?) (\{(?:[^{}]|\{[^{}]*\})*\}) :')
_DECOMPOSITION = re.compile(r'decomposition = (@[\w.$-]+)')


def inline_composites(module_text: str) -> str:
  """The StableHLO module text with every composite op replaced by a call of its decomposition."""
  def as_call(match: re.Match) -> str:
    function = _DECOMPOSITION.search(match.group(2)).group(1)
    return f'func.call {function}({match.group(1)}) :'
  text = _COMPOSITE.sub(as_call, module_text)
  if 'stablehlo.composite' in text:
    raise ExportError('a stablehlo.composite op of an unexpected form is left in the module')
  return text


def tensorflow_stablehlo_version() -> str:
  """The StableHLO version TensorFlow's XlaCallModule reads, e.g. '1.13.7'."""
  # pylint: disable=g-import-not-at-top
  from tensorflow.compiler.mlir.stablehlo import stablehlo as tf_stablehlo
  # pylint: enable=g-import-not-at-top
  return tf_stablehlo.get_current_version()


def write_saved_model(serve: Callable[[Any, jax.Array], serving.Outputs], variables: Any,
                      spec: jax.ShapeDtypeStruct, directory: str) -> None:
  """`serve(variables, images)` as a SavedModel in `directory` (see the module doc)."""
  # pylint: disable=g-import-not-at-top
  import jax.extend.mlir
  import tensorflow as tf
  from tensorflow.compiler.tf2xla.python import xla as tfxla
  # pylint: enable=g-import-not-at-top
  leaves, treedef = jax.tree.flatten(variables)
  flat = lambda leaves, images: serve(jax.tree.unflatten(treedef, leaves), images)
  with xla_paths():
    exported = jax.export.export(jax.jit(flat), platforms=['cpu'])(
        [jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype) for leaf in leaves], spec)
  if exported.calling_convention_version > tfxla.call_module_maximum_supported_version():
    raise ExportError(f'TensorFlow reads XlaCallModule up to version '
                      f'{tfxla.call_module_maximum_supported_version()}, the export is '
                      f'{exported.calling_convention_version}')
  module = jax.extend.mlir.serialize_portable_artifact(
      inline_composites(exported.mlir_module()), tensorflow_stablehlo_version())
  kept = exported.module_kept_var_idx
  out_shapes = [tf.TensorShape([d if isinstance(d, int) else None for d in aval.shape])
                for aval in exported.out_avals]
  out_types = [tf.as_dtype(aval.dtype) for aval in exported.out_avals]
  use_shardy = jax.config.jax_use_shardy_partitioner

  class Served(tf.Module):
    """The weights as variables and the serving signature."""

    def __init__(self):
      super().__init__()
      self.weights = [tf.Variable(np.asarray(leaf), trainable=False) for leaf in leaves]

    @tf.function(autograph=False, input_signature=[tf.TensorSpec(
        [None if not isinstance(d, int) else d for d in spec.shape], tf.as_dtype(spec.dtype),
        name=INPUT_NAME)])
    def serve(self, images):
      args = [arg for index, arg in enumerate([*self.weights, images]) if index in kept]
      results = tfxla.call_module(
          args, version=exported.calling_convention_version, module=module, Tout=out_types,
          Sout=out_shapes, platforms=[p.upper() for p in exported.platforms],
          use_shardy_partitioner=use_shardy)
      return jax.tree.unflatten(exported.out_tree, results)

  served = Served()
  tf.saved_model.save(served, directory, signatures={'serving_default': served.serve})


def run_saved_model(directory: str) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
  """The SavedModel in `directory`, reloaded by TensorFlow: images -> NumPy outputs."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  signature = tf.saved_model.load(directory).signatures['serving_default']
  return lambda images: {name: value.numpy() for name, value in
                         signature(**{INPUT_NAME: tf.constant(images)}).items()}


def write_onnx(serve: Callable[[Any, jax.Array], serving.Outputs], variables: Any,
               spec: jax.ShapeDtypeStruct, directory: str) -> None:
  """`serve(variables, images)` as DIRECTORY/model.onnx, the weights as initializers."""
  # pylint: disable=g-import-not-at-top
  import jax2onnx
  from onnx import numpy_helper
  # pylint: enable=g-import-not-at-top
  leaves, treedef = jax.tree.flatten(variables)
  # The weights enter as inputs, made initializers below: closed over, every operation on them
  # would run (and compile) in JAX while the converter traces.
  flat = lambda images, *leaves: serve(jax.tree.unflatten(treedef, leaves), images)
  weight_names = [f'weight_{index}' for index in range(len(leaves))]
  with xla_paths():
    output_names = sorted(jax.eval_shape(serve, variables, spec))  # A dict's flattening order.
  with xla_paths(), _quiet_converter():
    proto = jax2onnx.to_onnx(
        flat, [spec, *(jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype) for leaf in leaves)],
        input_names=[INPUT_NAME, *weight_names], output_names=output_names)
  graph = proto.graph
  values = dict(zip(weight_names, leaves))
  kept_inputs = [value for value in graph.input if value.name not in values]
  graph.initializer.extend(numpy_helper.from_array(np.asarray(values[value.name]), value.name)
                           for value in graph.input if value.name in values)
  del graph.input[:]
  graph.input.extend(kept_inputs)
  # Intermediate shapes as jax2onnx records them are not always right for a dynamic batch;
  # onnxruntime infers its own.
  del graph.value_info[:]
  with open(os.path.join(directory, ONNX_FILE), 'wb') as f:
    f.write(proto.SerializeToString())


@contextlib.contextmanager
def _quiet_converter():
  """Without jax2onnx's debugging prints and its warnings: its plugins for other libraries warn on
  import, and onnx_ir about values it leaves untyped."""
  loggers = [logging.getLogger(name) for name in ('jax2onnx', 'onnx_ir')]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def run_onnx(directory: str) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
  """DIRECTORY/model.onnx in onnxruntime (CPU): images -> NumPy outputs."""
  import onnxruntime  # pylint: disable=g-import-not-at-top
  options = onnxruntime.SessionOptions()
  options.log_severity_level = 3  # Errors only.
  session = onnxruntime.InferenceSession(os.path.join(directory, ONNX_FILE), options,
                                         providers=['CPUExecutionProvider'])
  names = [output.name for output in session.get_outputs()]
  return lambda images: dict(zip(names, session.run(names, {INPUT_NAME: images})))


WRITERS = {'saved_model': write_saved_model, 'onnx': write_onnx}
RUNNERS = {'saved_model': run_saved_model, 'onnx': run_onnx}


# ------------------------------------------------------------------------------------------------
# The check against JAX.
# ------------------------------------------------------------------------------------------------


def check_export(task: str, serve: Callable[[Any, jax.Array], serving.Outputs], variables: Any,
                 run: Callable[[np.ndarray], dict[str, np.ndarray]], spec: jax.ShapeDtypeStruct,
                 size: tuple[int, int], seed: int = 0) -> list[dict[str, Any]]:
  """Runs the export (`run`) and JAX (`serve`, jitted) on random inputs and compares them
  (`check_outputs`): one normal-noise batch of max(CHECK_BATCHES) images, given to the export
  whole and as its first images, each CHECK_BATCHES size (one JAX compilation); with
  preprocessing uint8 noise images at two sizes, one batch size each.

  Returns:
    Per input: {'input_shape', **check_outputs' figures}.
  """
  rng = np.random.default_rng(seed)
  reference = jax.jit(serve)
  if spec.dtype == jnp.uint8:
    sizes = [(size[0] + 13, size[1] * 2 - 7), (size[0] // 2 + 5, size[1] - 3)]
    pairs = []
    for batch, shape in zip(CHECK_BATCHES, sizes):
      images = rng.integers(0, 256, (batch, *shape, 3), dtype=np.uint8)
      pairs.append((images, reference(variables, images)))
  else:
    images = rng.standard_normal((max(CHECK_BATCHES), *size, 3)).astype(np.float32)
    expected = reference(variables, images)
    expected = jax.tree.map(np.asarray, expected)
    pairs = [(images[:batch], jax.tree.map(lambda x, batch=batch: x[:batch], expected))
             for batch in CHECK_BATCHES]
  return [{'input_shape': list(images.shape),
           **check_outputs(task, jax.tree.map(np.asarray, expected), run(images))}
          for images, expected in pairs]


def check_outputs(task: str, reference: Mapping[str, np.ndarray],
                  served: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Compares an export's outputs with JAX's.

  Float outputs must be within RELATIVE_TOLERANCE of the largest reference value; the argmax of
  logits (a classifier's class, a segmenter's label map) equal except where the reference's two
  best logits are within that tolerance (a tie either side may win); a detector's detection
  counts and classes equal.

  Returns:
    {'<output>_relative_error': max |served - reference| / max |reference|, 'argmax_ties': the
    tied positions allowed to differ}.

  Raises:
    ExportError: naming the first output that differs.
  """
  if sorted(reference) != sorted(served):
    raise ExportError(f'the export gives outputs {sorted(served)}, JAX {sorted(reference)}')
  figures = {}
  for name, expected in reference.items():
    got = np.asarray(served[name])
    if got.shape != expected.shape:
      raise ExportError(f'{name} has shape {got.shape} in the export, {expected.shape} in JAX')
    if np.issubdtype(expected.dtype, np.floating):
      scale = max(float(np.max(np.abs(expected))), float(np.finfo(np.float32).tiny))
      error = float(np.max(np.abs(got - expected))) / scale if expected.size else 0.0
      figures[f'{name}_relative_error'] = error
      if not error <= RELATIVE_TOLERANCE:
        raise ExportError(f'{task}: {name} differs from JAX by {error:.2e} of its largest value '
                          f'(tolerance {RELATIVE_TOLERANCE:g})')
    elif not np.array_equal(got, expected):
      raise ExportError(f'{task}: {name} differs from JAX at {int(np.sum(got != expected))} of '
                        f'{expected.size} entries')
  if 'logits' in reference:
    logits = reference['logits']
    scale = float(np.max(np.abs(logits)))
    best_two = -np.sort(-logits, axis=-1)[..., :2]
    tied = best_two[..., 0] - best_two[..., 1] <= 2 * RELATIVE_TOLERANCE * scale
    differ = np.argmax(served['logits'], -1) != np.argmax(logits, -1)
    if np.any(differ & ~tied):
      raise ExportError(f'{task}: the argmax of the logits differs from JAX at '
                        f'{int(np.sum(differ & ~tied))} positions')
    figures['argmax_ties'] = int(np.sum(differ))
  return figures


# ------------------------------------------------------------------------------------------------
# Export.
# ------------------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
  """'HxW' (or 'S') -> (H, W); argparse.ArgumentTypeError naming the text otherwise."""
  parts = text.lower().split('x')
  if len(parts) not in (1, 2) or not all(part.isdigit() and int(part) > 0 for part in parts):
    raise argparse.ArgumentTypeError(f'--size takes HxW or S in pixels, e.g. 224x224; got {text!r}')
  height, width = (int(parts[0]), int(parts[-1]))
  return height, width


def export(checkpoint: str, out: str, *, format: str, size: tuple[int, int] | None = None,
           with_preprocessing: bool = False, step: int | None = None,
           ema: bool = False) -> dict[str, Any]:
  """Exports a checkpoint's model for serving, checks it against JAX, writes OUT atomically.

  Returns:
    What OUT/export.json records: the model, the input and outputs, the checks.

  Raises:
    ExportError: one line naming what cannot be exported or does not match; OUT untouched.
  """
  if format not in FORMATS:
    raise ExportError(f'unknown format {format!r}; choose one of {", ".join(FORMATS)}')
  out = os.path.abspath(out)
  if os.path.exists(out):
    raise ExportError(f'{out} exists: choose a new path')
  try:
    info = checkpoints.read_model_info(checkpoint, step=step)
  except (FileNotFoundError, ValueError) as error:
    raise ExportError(str(error)) from None
  if info.task not in tasks.TASKS:
    raise ExportError(f'{checkpoint}: export does not know {info.task!r} models; it knows '
                      f'{sorted(tasks.TASKS)}')
  task = tasks.TASKS[info.task]
  if format in task.export_limits:
    raise ExportError(f'{info.task} model cannot be exported as {format}: '
                      f'{task.export_limits[format]}')
  size = size or task.serving_size(info)
  try:
    served_model, variables = tasks.load_model(
        checkpoint, step=step, ema=ema, dwconv_impl=DWCONV_IMPL[format], attention_impl='einsum')
  except (FileNotFoundError, ValueError) as error:
    raise ExportError(str(error)) from None
  serve = serving_function(served_model, info, size, with_preprocessing)
  spec = input_spec(size, with_preprocessing)
  with files.staged(out, replace=False) as staging_path:
    staging = str(staging_path)
    os.makedirs(staging)
    start = time.perf_counter()
    try:
      WRITERS[format](serve, variables, spec, staging)
    except ExportError:
      raise
    except Exception as error:  # The converter's own errors, whatever their type.
      raise ExportError(f'{info.task} model cannot be exported as {format}: '
                        f'{_first_line(error)}') from None
    export_s = time.perf_counter() - start
    checks = check_export(info.task, serve, variables, RUNNERS[format](staging), spec, size)
    metadata = {
        'checkpoint': checkpoint, 'format': format, 'task': info.task, 'variant': info.variant,
        'num_classes': info.num_classes, 'class_names': list(info.class_names or []),
        'input': {'name': INPUT_NAME, 'dtype': np.dtype(spec.dtype).name,
                  'shape': [d if isinstance(d, int) else None for d in spec.shape],
                  'preprocessing': with_preprocessing, 'size': list(size)},
        'outputs': sorted(jax.eval_shape(serve, variables, spec)),
        'checks': checks, 'export_seconds': round(export_s, 1)}
    with open(os.path.join(staging, METADATA_FILE), 'w') as f:
      json.dump(metadata, f, indent=2)
  return metadata


def _first_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return f'{type(error).__name__}: {lines[0] if lines else ""}'.rstrip(': ')


# ------------------------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
  quiet.silence_startup_noise()
  parser = argparse.ArgumentParser(
      prog=cli.program_name('secvit_jax.export'), description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('checkpoint',
                      help='a converted checkpoint or a training workdir (with its model.json)')
  parser.add_argument('out', help='the directory to write (must not exist)')
  parser.add_argument('--format', required=True, choices=FORMATS, help='what to write')
  parser.add_argument('--size', type=parse_size,
                      help="HxW the model runs at (default: the checkpoint's)")
  parser.add_argument('--with_preprocessing', action='store_true',
                      help='serve uint8 images of any size, resized and normalized inside')
  parser.add_argument('--step', type=int,
                      help='with a workdir: the checkpoint of this step (default: the newest)')
  parser.add_argument('--ema', action='store_true',
                      help='with a workdir: the exponential moving average of the weights')
  options = parser.parse_args(argv)
  try:
    metadata = export(options.checkpoint, options.out, format=options.format, size=options.size,
                      with_preprocessing=options.with_preprocessing, step=options.step,
                      ema=options.ema)
  except ExportError as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  errors = {key.removesuffix('_relative_error'): max(check[key] for check in metadata['checks'])
            for key in metadata['checks'][0] if key.endswith('_relative_error')}
  agreement = ', '.join(f'{name} within {error:.1e}' for name, error in errors.items())
  print(f'{options.out}: {metadata["task"]} model as {options.format}, input '
        f'{metadata["input"]["dtype"]} {metadata["input"]["shape"]}; outputs match JAX '
        f'({agreement or "exactly"}, relative to the largest value)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
