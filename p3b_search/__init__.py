"""p3b-search: AutoML search for pruning vision transformers after transfer.

``import p3b_search`` is light: :func:`load_pruned` (rebuild an exported pruned model from its
folder with torch, timm and safetensors only) is imported on first use.
"""
from __future__ import annotations

from typing import Any

__all__ = ["load_pruned"]


def __getattr__(name: str) -> Any:
    if name == "load_pruned":
        from p3b_search.export.load import load_pruned

        return load_pruned
    raise AttributeError(f"module 'p3b_search' has no attribute {name!r}")
