"""Atomic writes: a file or a folder is at its path complete, or not at all.

Everything secvit_jax writes for others to read (model.json, evaluation results, predicted label
maps, converted checkpoints, pictures, the demo scenes, the built CPU kernels) is written under a
hidden staging name in the same directory, then renamed into place, so that a reader, a crash or a
concurrent writer never sees it half-written:

    with files.staged(path) as staging:   # a whole write in one block
      staging.write_text(text)

or, for a folder filled across calls (`tasks.segmentation.PredictionWriter`), `staging_path` first
and `move_into_place` once it is complete. Paths are local or URLs that `etils.epath` reads
(gs://...).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator
import uuid

from etils import epath


def staging_path(path: str | os.PathLike) -> epath.Path:
  """A fresh hidden path beside `path`, ending as `path` does (PIL reads the format from the
  suffix); nothing is created."""
  path = epath.Path(path)
  return path.parent / f'.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}.{path.name}'


def move_into_place(staging: epath.Path, path: str | os.PathLike, *,
                    replace: bool = True) -> None:
  """Renames the finished `staging` file or folder to `path`.

  Args:
    staging: what `staging_path(path)` gave, now written.
    path: the destination. A file there is replaced atomically; a folder there is removed first
      when `replace` (a reader may then briefly find neither).
    replace: False keeps whatever is at `path` (e.g. the same folder written by another process
      first) and raises FileExistsError, leaving `staging` to the caller.
  """
  path = epath.Path(path)
  if path.exists() and not replace:
    raise FileExistsError(f'{path} exists already')
  if replace and path.is_dir():
    path.rmtree()
  staging.replace(path)


def remove(path: epath.Path) -> None:
  """Deletes the file or folder `path` if it is there."""
  if path.is_dir():
    path.rmtree()
  elif path.exists():
    path.unlink()


@contextlib.contextmanager
def staged(path: str | os.PathLike, *, replace: bool = True) -> Iterator[epath.Path]:
  """Yields `staging_path(path)` to write a file or a folder at (nothing is created there); once
  the block succeeds, it is moved into place (`move_into_place`); if the block fails, or the move
  does, it is removed."""
  staging = staging_path(path)
  try:
    yield staging
    move_into_place(staging, path, replace=replace)
  finally:
    remove(staging)


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes the file `path` atomically with `text`, creating its folder if need be."""
  epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
  with staged(path) as staging:
    staging.write_text(text)
