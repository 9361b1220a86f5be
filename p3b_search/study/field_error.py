"""A check's finding (:class:`FieldError`) and how a value of the study file is shown in it
(:func:`got`): the leaf of the study's messages, which the search-space entries
(:mod:`p3b_search.study.dimensions`) raise and :mod:`p3b_search.study.messages` builds on."""
from __future__ import annotations

from typing import Any


class FieldError(Exception):
    """A check's finding before the file name is known: ``path`` (dotted) and ``message``."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path, self.message = path, message


def got(value: Any) -> str:
    """A value as the YAML file would show it (``1.0`` as ``1``, strings quoted)."""
    if isinstance(value, str):
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)
