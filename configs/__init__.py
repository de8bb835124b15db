"""Experiment configs: one `get_config(arg)` per file, all built on `base`."""
