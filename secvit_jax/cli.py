"""What the absl command-line tools share: their config flag, start-up, and one-line errors.

`define_config_flag` is ml_collections' `DEFINE_config_file` with two changes to how the file is
read. A file that does not exist is an error while the flags are parsed (ml_collections keeps it
until the config is first read, by then the program has started its work). A file in a directory
named `configs` sees that directory as the package `configs` while it loads, so that
`from configs import common` in `configs/*.py` works from any working directory, run as
`python train.py` in a checkout or as an installed command, without a top-level package named
`configs` in site-packages.

`run(main)` replaces `absl.app.run(main)`: it silences the start-up noise (`quiet`), and a mistake
on the command line (an unknown flag or config field, a bad value, a missing config file) ends the
program with one line on stderr and status 1, a misspelt config field with the nearest fields'
names. `--help` lists the flags of `main`'s module, whichever file was started, and exits with
status 0 (absl's exits with 1).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.machinery
import importlib.util
import os
import re
import sys
from typing import Any, Callable, Iterator

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from secvit_jax import quiet

_HELP_FLAG = re.compile(r'--?(\?|help|helpshort|helpfull|helpxml)(=.*)?')

# Flags defined through this module belong to its caller (absl lists them under the caller's help).
flags.disclaim_key_flags()


def define_config_flag(name: str, help_string: str) -> flags.FlagHolder:
  """A `--NAME=FILE.py` flag whose value is the file's `get_config()`, locked, and whose fields
  `--NAME.FIELD=VALUE` override (ml_collections' config file flag)."""
  holder = config_flags.DEFINE_config_file(name, None, help_string, lock_config=True)
  flags.FLAGS[name].parser = _ConfigFileParser(flags.FLAGS[name].parser)
  return holder


class _ConfigFileParser(flags.ArgumentParser):
  """ml_collections' reader of a config file, `parser`, with a missing file a `ValueError` (which
  absl reports as a bad flag value) and the file's own `configs` directory the package `configs`
  while it loads. Remembers the config it read, for naming an override of a field it lacks."""

  def __init__(self, parser: flags.ArgumentParser):
    self._parser = parser
    self.filename = None
    self.config = None

  def parse(self, argument):
    filename = argument.split(':', 1)[0]  # FILE.py[:ARGUMENT of get_config]
    if not os.path.isfile(filename):
      raise ValueError(f'no such file: {os.path.abspath(filename)}')
    directory = os.path.dirname(os.path.abspath(filename))
    package = (_as_configs_package(directory) if os.path.basename(directory) == 'configs'
               else contextlib.nullcontext())
    with package:
      self.filename, self.config = filename, self._parser.parse(argument)
    return self.config

  def flag_type(self):
    return self._parser.flag_type()


@contextlib.contextmanager
def _as_configs_package(directory: str) -> Iterator[None]:
  """Imports of `configs.X` find `directory/X.py` while the block runs; `sys.modules` is then as
  it was (a `configs` of the program's own stays untouched)."""
  def ours():
    return {name: module for name, module in sys.modules.items()
            if name == 'configs' or name.startswith('configs.')}
  saved = ours()
  for name in saved:
    del sys.modules[name]
  spec = importlib.machinery.ModuleSpec('configs', None, is_package=True)
  spec.submodule_search_locations = [directory]
  sys.modules['configs'] = importlib.util.module_from_spec(spec)
  try:
    yield
  finally:
    for name in ours():
      del sys.modules[name]
    sys.modules.update(saved)


def run(main: Callable[[list[str]], Any]) -> None:
  """`absl.app.run(main)` with quiet start-up, one-line errors and `--help` for `main`'s flags."""
  quiet.silence_startup_noise()
  module = sys.modules[main.__module__]
  if module is not sys.modules['__main__']:
    # absl's help shows the docstring of __main__ and the flags of the file that was started
    # (sys.argv[0]): make those `main`'s, for a console script or a checkout's train.py.
    sys.modules['__main__'].__doc__ = module.__doc__
    for flag in flags.FLAGS.get_flags_for_module(module.__name__):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  app.run(main, flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except SystemExit as exit_:
    # absl's --help, --helpshort and --helpfull print the help, then exit with status 1.
    if exit_.code == 1 and any(_HELP_FLAG.fullmatch(arg) for arg in argv[1:]):
      raise SystemExit(0) from None
    raise
  except flags.Error as error:
    _exit_with_error(str(error))
  except (AttributeError, KeyError):
    # ml_collections' way of refusing `--config.FIELD=...` for a field the config lacks: a
    # traceback of three chained exceptions, its last line `AttributeError: "'FIELD'"`.
    unknown = _unknown_field_message(argv)
    if unknown is None:
      raise
    _exit_with_error(unknown)


def _exit_with_error(message: str) -> None:
  print(f'{os.path.basename(sys.argv[0])}: error: {message}', file=sys.stderr)
  sys.exit(1)


def _unknown_field_message(argv: list[str]) -> str | None:
  """Names the first `--NAME.FIELD` of `argv` whose config has no FIELD, and what was meant."""
  for name in list(flags.FLAGS):
    flag = flags.FLAGS[name]
    parser = flag.parser
    if not isinstance(parser, _ConfigFileParser) or parser.config is None:
      continue
    for arg in argv[1:]:
      match = re.match(rf'--?(?:no)?{re.escape(flag.name)}\.([^=]+)', arg)
      if match and not _has_field(parser.config, match[1]):
        message = f'--{flag.name}.{match[1]}: {parser.filename} has no field {match[1]!r}'
        meant = [f'--{flag.name}.{field}'
                 for field in _nearest_fields(match[1], list(_field_paths(parser.config)))]
        if not meant:
          return message
        either = meant[0] if len(meant) == 1 else f'{", ".join(meant[:-1])} or {meant[-1]}'
        return f'{message}. Did you mean {either}?'
  return None


def _has_field(config: Any, path: str) -> bool:
  node = config
  for key in path.split('.'):
    if not isinstance(node, (ml_collections.ConfigDict, dict)):
      return True  # Inside a value (a tuple, a dataclass): ml_collections judges that.
    if key not in node:
      return False
    node = node[key]
  return True


def _field_paths(config: Any, prefix: str = '') -> Iterator[str]:
  for key, value in config.items():
    yield prefix + key
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield from _field_paths(value, f'{prefix}{key}.')


def _nearest_fields(typed: str, fields: list[str]) -> list[str]:
  """The fields `typed` most likely meant, at most three: close in spelling as a whole
  ('optimizer.base_l'), else by the last name at any depth ('base_lr' for 'optimizer.base_lr'),
  else those whose last name holds all its words ('batch': 'batch_size', 'eval_batch_size'), else
  those that abbreviate it ('learning_rate' as 'lr': 'optimizer.base_lr', ...)."""
  close = difflib.get_close_matches(typed, fields, n=1, cutoff=0.8)
  if close:
    return close

  def last_name(path):
    return path.rsplit('.', 1)[-1]

  def words(path):
    return [word for word in last_name(path).split('_') if word]

  close = difflib.get_close_matches(last_name(typed), [last_name(f) for f in fields], n=1,
                                    cutoff=0.8)
  initials = ''.join(word[0] for word in words(typed)) if len(words(typed)) > 1 else None
  meant = ([f for f in fields if close and last_name(f) == close[0]] or
           [f for f in fields if words(typed) and set(words(typed)) <= set(words(f))] or
           [f for f in fields if initials in words(f)])
  return meant[:3]


def program_name(module: str) -> str:
  """How the user started an argparse command: its console script's name ('secvit-predict'), else
  'python -m MODULE' (argparse's default would say '__main__.py')."""
  started = os.path.basename(sys.argv[0]) if sys.argv else ''
  return started if started.startswith('secvit-') else f'python -m {module}'
