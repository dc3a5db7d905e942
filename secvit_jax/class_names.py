"""The names of a checkpoint's classes, as `secvit-predict` shows them.

Names: those model.json records (a folder's class directories, the digits' '0'..'9'), shown as
ImageNet's words where they are ImageNet synsets; ImageNet's for a 1000-class checkpoint that
records none (a converted release checkpoint); else the class indices.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib.resources

from secvit_jax import checkpoints

IMAGENET_CLASSES_FILE = 'assets/imagenet2012_classes.tsv'
IMAGENET_NUM_CLASSES = 1000


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
