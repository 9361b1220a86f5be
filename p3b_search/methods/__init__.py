"""Pruning methods, selectable by name (see :func:`get_method`): the implementations (torch),
imported where a model is trained or cut. Their names, knobs and facts are in
:mod:`p3b_search.method_specs`."""
from p3b_search.methods import (
    baselines,  # noqa: F401  (registers "uniform-magnitude", "global-taylor")
    dense,  # noqa: F401  (registers "dense")
    dimap,  # noqa: F401  (registers "dimap", "dimap-structured")
    p3b,  # noqa: F401  (registers "p3b")
    s2vite,  # noqa: F401  (registers "s2vite")
    svite,  # noqa: F401  (registers "svite")
)
from p3b_search.methods.base import (
    PrunedModel,
    PruningMethod,
    SharedPrefix,
    available_methods,
    get_method,
    register_method,
)

__all__ = [
    "PrunedModel",
    "PruningMethod",
    "SharedPrefix",
    "available_methods",
    "get_method",
    "register_method",
]
