"""Data sets and loaders: the embedded digits and glyphs transfer tasks, and local folders via timm."""
from p3b_search.data.loaders import EpochShuffleSampler, build_loaders, model_input_size, resolve_input_config

__all__ = ["EpochShuffleSampler", "build_loaders", "model_input_size", "resolve_input_config"]
