"""Heads and necks on the SecViT backbone for dense prediction (segmentation, detection)."""
