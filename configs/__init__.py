"""Run configs: ml_collections ConfigDicts, one file per family, variants through ``file.py:variant``."""
