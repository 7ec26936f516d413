"""Data: sources, tokenizers, token caches, objectives, packing and the grain loader."""
