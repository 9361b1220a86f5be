"""Pruning methods, selectable by name (see :func:`get_method`)."""
from p3b_search.methods.base import (
    MethodConfig,
    PrunedModel,
    PruningMethod,
    available_methods,
    get_method,
    register_method,
)
from p3b_search.methods import dense  # noqa: F401  (registers "dense")

__all__ = [
    "MethodConfig",
    "PrunedModel",
    "PruningMethod",
    "available_methods",
    "get_method",
    "register_method",
]
