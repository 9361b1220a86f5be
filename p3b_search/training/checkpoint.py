"""Full-state training checkpoints: tensors and plain Python only, written atomically.

A checkpoint lives in a folder as ``checkpoint.pt``. It is written to a temporary file in the
same folder, flushed to disk, then renamed over the previous one, so a process killed while
writing leaves the previous checkpoint intact. It is read back with ``weights_only=True``.
torch is imported by the functions that need it: the study driver reads :data:`CHECKPOINT_FILE`
(through :mod:`.prefixes`) and imports no torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from p3b_search.errors import first_line
from p3b_search.files import atomic_write

CHECKPOINT_FILE = "checkpoint.pt"


def checkpoint_path(location: str | Path) -> Path:
    """The checkpoint file of ``location`` (a checkpoint folder, or the file itself)."""
    location = Path(location)
    return location if location.suffix == ".pt" else location / CHECKPOINT_FILE


def save_checkpoint(state: dict[str, Any], directory: str | Path) -> Path:
    """Write ``state`` to ``directory/checkpoint.pt`` atomically; returns the file path."""
    import torch

    target = Path(directory) / CHECKPOINT_FILE
    with atomic_write(target) as tmp:
        torch.save(state, tmp)
    return target


def load_checkpoint(location: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors mapped to the CPU)."""
    import torch

    path = checkpoint_path(location)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: pass the folder a previous epoch reported")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"cannot read checkpoint {path} (corrupt, or holds objects other than tensors and plain Python): "
            f"{first_line(error)}"
        ) from None
