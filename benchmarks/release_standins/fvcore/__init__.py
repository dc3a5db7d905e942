"""Stand-in for fvcore: only the names the release's SecViT.py imports (see ../README.md)."""
