"""Pruning methods, selectable by name (see :func:`get_method`)."""
from p3b_search.methods.base import (
    MethodConfig,
    PrunedModel,
    PruningMethod,
    SharedPrefix,
    available_methods,
    get_method,
    register_method,
)
from p3b_search.methods import dense  # noqa: F401  (registers "dense")
from p3b_search.methods import p3b  # noqa: F401  (registers "p3b")
from p3b_search.methods import baselines  # noqa: F401  (registers "uniform-magnitude", "global-taylor")
from p3b_search.methods import dimap  # noqa: F401  (registers "dimap", "dimap-structured")
from p3b_search.methods import svite  # noqa: F401  (registers "svite")
from p3b_search.methods import s2vite  # noqa: F401  (registers "s2vite")

__all__ = [
    "MethodConfig",
    "PrunedModel",
    "PruningMethod",
    "SharedPrefix",
    "available_methods",
    "get_method",
    "register_method",
]
