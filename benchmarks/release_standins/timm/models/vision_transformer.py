"""Stand-in for timm.models.vision_transformer: `_cfg`, the default config dict of a model."""


def _cfg(url: str = '', **kwargs):
  return {'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), **kwargs}
