"""The pruning methods as the study and search layers know them, without torch: each method's
knobs (a :class:`MethodConfig` subclass) and facts (:class:`MethodSpec`) by name
(:func:`method_spec`), when the gated methods act (:mod:`.schedule`) and the allocation-row
schema (:mod:`.allocation`). The study driver reads only these; the implementations
(:mod:`p3b_search.methods`, torch and timm) run where a model is trained or cut.

Importing this package registers the shipped methods' specs.
"""
from p3b_search.method_specs import (
    baselines,  # noqa: F401  (registers "uniform-magnitude", "global-taylor")
    dense,  # noqa: F401  (registers "dense")
    dimap,  # noqa: F401  (registers "dimap", "dimap-structured")
    p3b,  # noqa: F401  (registers "p3b")
    s2vite,  # noqa: F401  (registers "s2vite")
    svite,  # noqa: F401  (registers "svite")
)
from p3b_search.method_specs.base import MethodConfig, MethodSpec, method_names, method_spec, register_spec

__all__ = ["MethodConfig", "MethodSpec", "method_names", "method_spec", "register_spec"]
