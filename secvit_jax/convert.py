"""Converts the release's PyTorch checkpoints into Flax variables and orbax checkpoints.

    python -m secvit_jax.convert --variant secvit_s [--ema] INPUT.pth OUTPUT_DIR
    python -m secvit_jax.convert --variant secvit_t --model.depths=1,1,2,1 ... INPUT.pth OUTPUT_DIR

The output is a checkpoint of `secvit_jax.checkpoints` with its model.json (variant, classes,
model overrides of a reduced or modified model, image size), so `secvit_jax.load_model(OUTPUT_DIR)`
rebuilds the model without being told what it is.

Layout of a release checkpoint: a `torch.save` dict with `model` and `model_ema` state
dicts (same keys, maybe prefixed `module.`), optimizer state, and an `argparse.Namespace` under
`args`. It is read with `torch.load(weights_only=True)`, allowing `argparse.Namespace` and nothing
else, so no arbitrary code is unpickled. torch is imported only here, and only when reading.

The mapping from a Flax leaf to its release key is `release_key`; `convert_state_dict` fills every
Flax leaf from a NumPy state dict, checking every shape and that every key is used.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from secvit_jax import checkpoints
from secvit_jax import cli
from secvit_jax import files
from secvit_jax import model as model_lib
from secvit_jax import quiet

# Release keys that hold no Flax leaf: BatchNorm step counters, and the RoPE frequency buffer
# (checked against the formula instead).
_IGNORED_KEY = re.compile(r'(\.num_batches_tracked|\.RoPE\.angle)$')
_ROPE_KEY = re.compile(r'^layers\.(\d+)\.RoPE\.angle$')


class ConversionError(ValueError):
  """A release checkpoint does not match the model it is converted into."""


def release_key(collection: str, path: tuple[str, ...]) -> str:
  """The release state-dict key of a Flax leaf.

  Args:
    collection: 'params' or 'batch_stats'.
    path: the leaf's path in that collection, e.g. ('stage_0', 'block_1', 'attn', 'qkv', 'kernel').
  """
  *modules, leaf = path
  prefix: list[str] = []
  for name in modules:
    if match := re.fullmatch(r'conv_(\d)', name):  # Stem convs sit at 0, 3, 6, 9.
      prefix.append(str(3 * int(match[1])))
    elif match := re.fullmatch(r'bn_(\d)', name):  # Their BatchNorms at 1, 4, 7, 10.
      prefix.append(str(3 * int(match[1]) + 1))
    elif name == 'stem':
      prefix += ['patch_embed', 'proj']
    elif match := re.fullmatch(r'stage_(\d+)', name):
      prefix += ['layers', match[1]]
    elif match := re.fullmatch(r'block_(\d+)', name):
      prefix += ['blocks', match[1]]
    elif name in ('norm1', 'norm2'):
      prefix += [name, 'norm']
    else:
      prefix.append(name)
  leaf_name = {
      ('params', 'kernel'): 'weight', ('params', 'scale'): 'weight', ('params', 'bias'): 'bias',
      ('batch_stats', 'mean'): 'running_mean', ('batch_stats', 'var'): 'running_var',
  }.get((collection, leaf), leaf)  # gamma_1 / gamma_2 keep their names.
  return '.'.join(prefix + [leaf_name])


def release_layout(
    model: model_lib.SecViT) -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]:
  """Every Flax leaf of `model`, by release key: key -> (collection, path, Flax shape).

  Computed with `jax.eval_shape`, so it costs no memory and no compilation.
  """
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
  layout = {}
  for collection in ('params', 'batch_stats'):
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes[collection]):
      names = tuple(p.key for p in path)
      layout[release_key(collection, names)] = (collection, names, leaf.shape)
  return layout


def _from_release(value: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
  """Re-lays a release tensor for a Flax leaf of `flax_shape`; raises ValueError on a mismatch."""
  if len(flax_shape) == 4:  # Conv (O, I/groups, kh, kw) -> (kh, kw, I/groups, O).
    expected = (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
    convert = lambda v: v.transpose(2, 3, 1, 0)
  elif len(flax_shape) == 2:  # 1×1 conv (O, I, 1, 1) -> Dense (I, O).
    expected = (flax_shape[1], flax_shape[0], 1, 1)
    convert = lambda v: v[:, :, 0, 0].T
  elif len(flax_shape) == 1 and value.ndim == 4:  # Layer scale (1, C, 1, 1) -> (C,).
    expected = (1, flax_shape[0], 1, 1)
    convert = lambda v: v.reshape(-1)
  else:
    expected, convert = flax_shape, lambda v: v
  if tuple(value.shape) != expected:
    raise ValueError(f'shape {tuple(value.shape)}, expected {expected}')
  return np.ascontiguousarray(convert(value), dtype=np.float32)


def _rope_head_dims(model: model_lib.SecViT) -> dict[int, int]:
  return {stage: dim // heads for stage, (dim, heads) in enumerate(zip(model.embed_dims,
                                                                      model.num_heads))}


def convert_state_dict(state_dict: Mapping[str, np.ndarray],
                       model: model_lib.SecViT) -> dict[str, Any]:
  """Fills `model`'s variables from a release state dict.

  Args:
    state_dict: release key -> NumPy array.
    model: the SecViT to fill; its structure decides which keys are needed.

  Returns:
    {'params': ..., 'batch_stats': ...} of float32 NumPy arrays.

  Raises:
    ConversionError: naming every missing key, unused key and shape mismatch.
  """
  state_dict = {key: np.asarray(value) for key, value in state_dict.items()}
  missing, mismatched = [], []
  used: set[str] = set()
  variables: dict[str, Any] = {'params': {}, 'batch_stats': {}}
  for key, (collection, path, shape) in release_layout(model).items():
    if key not in state_dict:
      missing.append(key)
      continue
    used.add(key)
    try:
      value = _from_release(state_dict[key], shape)
    except ValueError as error:
      mismatched.append(f'{key}: {error}')
      continue
    node = variables[collection]
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  head_dims = _rope_head_dims(model)
  for key, value in state_dict.items():
    if match := _ROPE_KEY.match(key):
      stage = int(match[1])
      if stage in head_dims:
        used.add(key)
        expected = model_lib.rope_angle(head_dims[stage])
        if value.shape != expected.shape:
          mismatched.append(f'{key}: shape {value.shape}, expected {expected.shape}')
        elif not np.allclose(value, expected, rtol=1e-6, atol=0):
          mismatched.append(f'{key}: differs from 1 / 10000 ** linspace(0, 1, d / 4), repeated')
    elif _IGNORED_KEY.search(key):
      used.add(key)
  unused = sorted(set(state_dict) - used)
  if missing or mismatched or unused:
    problems = []
    for title, keys in (('missing keys', missing), ('shape mismatches', mismatched),
                        ('unexpected keys', unused)):
      if keys:
        shown = '\n    '.join(keys[:25]) + (f'\n    ... and {len(keys) - 25} more'
                                              if len(keys) > 25 else '')
        problems.append(f'  {len(keys)} {title}:\n    {shown}')
    raise ConversionError('the checkpoint does not match the model:\n' + '\n'.join(problems))
  return variables


def read_release_checkpoint(path: str, *, ema: bool = False) -> dict[str, np.ndarray]:
  """Reads the `model` (or with `ema`, `model_ema`) state dict of a release checkpoint as NumPy.

  Accepts a full training checkpoint or a bare state dict; strips a `module.` prefix. Raises
  ConversionError when the file cannot be read (truncated, not a checkpoint) or lacks the
  requested state dict.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ConversionError(
        'reading PyTorch checkpoints needs torch: pip install -r requirements-convert.txt'
    ) from error
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      checkpoint = torch.load(path, map_location='cpu', weights_only=True)
  except FileNotFoundError:
    raise ConversionError(f'{path}: no such file') from None
  except Exception as error:  # torch raises many types for corrupt files.
    raise ConversionError(f'{path}: not a readable PyTorch checkpoint ({error})') from error
  if not isinstance(checkpoint, dict):
    raise ConversionError(f'{path}: holds a {type(checkpoint).__name__}, not a checkpoint dict')
  entry = 'model_ema' if ema else 'model'
  if entry in checkpoint and isinstance(checkpoint[entry], dict):
    state_dict = checkpoint[entry]
  elif not ema and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
    state_dict = checkpoint  # A bare state dict.
  else:
    raise ConversionError(f'{path}: has no {entry!r} state dict (keys: {sorted(checkpoint)})')
  # A DDP-wrapped model saves its keys with a 'module.' prefix.
  return {key.removeprefix('module.'): value.detach().cpu().numpy()
          for key, value in state_dict.items() if isinstance(value, torch.Tensor)}


def convert_checkpoint(input_path: str, output_dir: str, *, variant: str | None = None,
                       model_overrides: Mapping[str, Any] | None = None,
                       model: model_lib.SecViT | None = None, ema: bool = False,
                       image_size: int = checkpoints.DEFAULT_IMAGE_SIZE,
                       class_names: Sequence[str] | None = None) -> checkpoints.ModelInfo:
  """Converts a release checkpoint into an orbax checkpoint at `output_dir`.

  Args:
    input_path: the release checkpoint (.pth).
    output_dir: the directory to create; it must not exist.
    variant: the variant the checkpoint holds ('secvit_s', ...), its class count read off `head`.
    model_overrides: with `variant`, SecViT fields where the checkpoint's model differs from it
      (a reduced or modified model), e.g. {'depths': (1, 1, 2, 1)}; see
      `checkpoints.check_model_overrides`.
    model: instead of `variant`, the exact SecViT to fill; model.json then lists all its fields.
    ema: convert `model_ema` instead of `model`.
    image_size: the S×S size the model is evaluated at, recorded for `predict`.
    class_names: one name per class, recorded (ImageNet's are known without them).

  Returns:
    The ModelInfo written as model.json beside the variables: `load_model(output_dir)` rebuilds
    the model from it.

  Nothing is left at `output_dir` unless the whole conversion succeeds: the checkpoint is written
  into a temporary directory beside it and renamed into place at the end.
  """
  if (variant is None) == (model is None):
    raise ValueError('give exactly one of variant= and model=')
  if model is not None and model_overrides:
    raise ValueError('model_overrides apply to a variant; with model= the model is complete')
  if not (isinstance(image_size, int) and image_size > 0):
    raise ConversionError(f'image_size must be a positive integer, got {image_size!r}')
  overrides = {}
  if variant is not None:
    try:
      overrides = checkpoints.check_model_overrides(variant, model_overrides or {})
    except ValueError as error:
      raise ConversionError(str(error)) from None
  output_dir = os.path.abspath(output_dir)
  if os.path.exists(output_dir):
    raise ConversionError(f'{output_dir} exists already; remove it or choose another path')
  state_dict = read_release_checkpoint(input_path, ema=ema)
  if model is None:
    model = model_lib.create_model(variant, num_classes=_num_classes(state_dict), **overrides)
  if class_names is not None and len(class_names) != model.num_classes:
    raise ConversionError(f'{len(class_names)} class names for a checkpoint of '
                          f'{model.num_classes} classes')
  described = variant or 'a custom SecViT'
  if overrides:
    described += ' with ' + ', '.join(f'{name}={value}' for name, value in overrides.items())
  print(f'converting {input_path} ({"model_ema" if ema else "model"}, {len(state_dict)} tensors) '
        f'into {described} with {model.num_classes} classes', file=sys.stderr)
  try:
    variables = convert_state_dict(state_dict, model)
  except ConversionError as error:
    if variant is None:
      raise
    matches = [name for name in model_lib.VARIANTS
               if (name != variant or overrides) and _fits(state_dict, name)]
    if matches:
      hint = f'it holds {" or ".join(matches)}: pass --variant {matches[0]}'
      hint += ' without model overrides' if overrides else ''
    else:
      hint = 'it matches none of the released variants' + (
          '; check the model overrides' if overrides else ' (a reduced or modified model needs '
          '--model.<field>=<value> overrides)')
    raise ConversionError(f'{error}\n  as {variant}{" with overrides" if overrides else ""}; '
                          f'{hint}') from None
  fields = {name: getattr(model, name) for name in checkpoints.architecture_fields()}
  info = checkpoints.ModelInfo(
      variant=variant, num_classes=model.num_classes,
      model_overrides=checkpoints.model_overrides_json(variant, fields), image_size=image_size,
      class_names=tuple(class_names) if class_names is not None else None,
      source=os.path.abspath(input_path), ema=ema)
  os.makedirs(os.path.dirname(output_dir), exist_ok=True)
  with files.staged(output_dir, replace=False) as staging:
    checkpoints.save_variables(os.fspath(staging), variables, info.to_json())
  return info


def _fits(state_dict: Mapping[str, np.ndarray], variant: str) -> bool:
  """Whether `state_dict` has exactly the keys and sizes of `variant` (any class count)."""
  model = model_lib.create_model(variant, num_classes=_num_classes(state_dict))
  wanted = {key: int(np.prod(shape)) for key, (_, _, shape) in release_layout(model).items()}
  have = {key: value.size for key, value in state_dict.items() if not _IGNORED_KEY.search(key)}
  return have == wanted


def _num_classes(state_dict: Mapping[str, np.ndarray]) -> int:
  if 'head.bias' in state_dict:
    return int(state_dict['head.bias'].shape[0])
  raise ConversionError('the checkpoint has no head.bias, so its number of classes is unknown')


MODEL_FLAG = '--model.'


def parse_override_value(text: str) -> Any:
  """A command-line override value as Python: '1,1,2,1' -> (1, 1, 2, 1), '0.1' -> 0.1,
  'true,false' -> (True, False); text that is no literal stays a string ('xla')."""
  python = re.sub(r'\b(true|false)\b', lambda match: match[1].capitalize(), text.strip(),
                  flags=re.IGNORECASE)
  try:
    return ast.literal_eval(python)
  except (ValueError, SyntaxError):
    return text


def split_model_flags(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
  """Takes the `--model.FIELD=VALUE` (or `--model.FIELD VALUE`) flags out of `argv`.

  Returns:
    (the other arguments, {FIELD: parsed value}).

  Raises:
    ConversionError: for a flag without a field name or without a value.
  """
  rest, overrides = [], {}
  arguments = iter(argv)
  for argument in arguments:
    if not argument.startswith(MODEL_FLAG):
      rest.append(argument)
      continue
    name, has_value, value = argument[len(MODEL_FLAG):].partition('=')
    if not has_value:
      value = next(arguments, None)
      if value is None:
        raise ConversionError(f'{argument} needs a value, e.g. {MODEL_FLAG}depths=1,1,2,1')
    if not name:
      raise ConversionError(f'{argument}: name a SecViT field, e.g. {MODEL_FLAG}depths=1,1,2,1')
    overrides[name] = parse_override_value(value)
  return rest, overrides


def _read_overrides_file(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      overrides = json.load(f)
  except (OSError, json.JSONDecodeError) as error:
    raise ConversionError(f'--model_overrides {path}: {error}') from None
  if not isinstance(overrides, dict):
    raise ConversionError(f'--model_overrides {path}: holds a JSON {type(overrides).__name__}, '
                          'not an object of SecViT fields')
  return overrides


def _read_class_names(path: str) -> list[str]:
  try:
    with open(path) as f:
      return [line.strip() for line in f if line.strip()]
  except OSError as error:
    raise ConversionError(f'--class_names {path}: {error.strerror}') from None


def main(argv: list[str] | None = None) -> int:
  """The `secvit-convert` command."""
  quiet.silence_startup_noise()
  parser = argparse.ArgumentParser(
      prog=cli.program_name('secvit_jax.convert'), description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog='A reduced or modified model: give the SecViT fields where it differs from the\n'
      'variant, e.g.\n'
      '  --model.depths=1,1,2,1 --model.embed_dims=32,64,96,128 \\\n'
      '  --model.layer_scales=false,false,true,true\n'
      'or --model_overrides=FILE.json holding {"depths": [1, 1, 2, 1], ...} (the flags win).\n'
      'They are recorded in model.json, so the checkpoint loads without them.')
  parser.add_argument('--variant', required=True, choices=sorted(model_lib.VARIANTS),
                      help='the SecViT variant the checkpoint holds (or modifies, with overrides)')
  parser.add_argument('--ema', action='store_true',
                      help="convert the EMA weights ('model_ema') instead of 'model'")
  parser.add_argument('--model_overrides', metavar='FILE.json',
                      help='a JSON object of SecViT fields where the model differs from the '
                      'variant')
  parser.add_argument('--image_size', type=int, default=checkpoints.DEFAULT_IMAGE_SIZE,
                      help='the S×S size the model is evaluated at (default: %(default)s)')
  parser.add_argument('--class_names', metavar='FILE',
                      help='a text file of class names, one per line in class order (ImageNet\'s '
                      'are known without it)')
  parser.add_argument('input', help='release checkpoint (.pth)')
  parser.add_argument('output', help='directory to create for the orbax checkpoint')
  try:
    rest, flag_overrides = split_model_flags(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(rest)
    overrides = _read_overrides_file(args.model_overrides) if args.model_overrides else {}
    overrides.update(flag_overrides)
    class_names = _read_class_names(args.class_names) if args.class_names else None
    info = convert_checkpoint(args.input, args.output, variant=args.variant,
                              model_overrides=overrides, ema=args.ema,
                              image_size=args.image_size, class_names=class_names)
  except ConversionError as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  print(f'wrote {args.output}: {info.variant}, {info.num_classes} classes'
        + (f', overrides {info.model_overrides}' if info.model_overrides else ''), file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
