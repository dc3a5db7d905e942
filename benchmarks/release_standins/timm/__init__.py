"""Stand-in for timm: only the names the release's SecViT.py imports (see ../README.md)."""
