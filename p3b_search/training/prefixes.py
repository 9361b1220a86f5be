"""Checkpoints of training prefixes that several trials share (a study's ``shared_prefixes``).

Trials whose prune stage trains identically up to an epoch (same model, weights, data, training
configuration, seed, method and the method's knobs that act before it prunes) need that prefix
trained once. Its full-state checkpoint (:mod:`p3b_search.training.checkpoint`) is kept under
the cache folder (the study's ``prefixes/``), by the hash of what determines it::

    <root>/<key>/epoch-<k>/    the state after the first k epochs of the prune stage
        checkpoint.pt          the trial's full-state checkpoint of epoch k - 1 (0-based)
        prefix.json            the completion marker, written last: key, k, what the key covers

A prefix is published atomically: both files are written and flushed in a hidden folder
``.epoch-<k>-*.partial`` next to it, which is then renamed to ``epoch-<k>``. A rename never
replaces a published prefix, so of two trials that trained the same prefix at once one
publishes and the other keeps its copy to itself; a process killed while publishing leaves only
a ``.partial`` folder, never read, which :meth:`PrefixCache.clean_incomplete` removes when no
trial runs (a study's start). Published prefixes are never changed or removed while a study runs,
so a trial reads one in place.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p3b_search.training.checkpoint import CHECKPOINT_FILE

PREFIX_RECORD = "prefix.json"
EPOCH_FOLDER = "epoch-"
PARTIAL_SUFFIX = ".partial"
#: Version of what a key covers: a change of the key's inputs makes every older prefix unreachable.
KEY_VERSION = 1


def prefix_key(inputs: Mapping[str, Any]) -> str:
    """The cache key of a prefix: a hash of ``inputs`` (JSON values, key order irrelevant)."""
    text = json.dumps({"version": KEY_VERSION, **inputs}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Prefix:
    """One published prefix: the state after the first ``epochs`` prune-stage epochs."""

    root: Path
    epochs: int

    @property
    def checkpoint(self) -> Path:
        """The full-state checkpoint (``resume_from`` of the training loop)."""
        return self.root / CHECKPOINT_FILE

    @property
    def record(self) -> Path:
        """``prefix.json``: the completion marker."""
        return self.root / PREFIX_RECORD


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _epochs_of(folder: Path) -> int | None:
    digits = folder.name.removeprefix(EPOCH_FOLDER)
    return int(digits) if folder.name.startswith(EPOCH_FOLDER) and digits.isdigit() else None


class PrefixCache:
    """The published prefixes under ``root`` (see the module docstring for the layout)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def prefix(self, key: str, epochs: int) -> Prefix:
        """Where the prefix of ``key`` after ``epochs`` epochs lives (published or not)."""
        return Prefix(self.root / key / f"{EPOCH_FOLDER}{epochs}", epochs)

    def complete(self, prefix: Prefix, key: str) -> bool:
        """Whether ``prefix`` is published: its marker exists and names ``key`` and its epochs."""
        try:
            record = json.loads(prefix.record.read_text())
        except (OSError, ValueError):
            return False
        return (isinstance(record, dict) and record.get("key") == key and record.get("epochs") == prefix.epochs
                and prefix.checkpoint.is_file())

    def find(self, key: str, max_epochs: int) -> Prefix | None:
        """The longest published prefix of ``key`` with at most ``max_epochs`` epochs (None: none)."""
        folder = self.root / key
        if max_epochs < 1 or not folder.is_dir():
            return None
        found = [Prefix(path, epochs) for path in folder.iterdir()
                 if (epochs := _epochs_of(path)) is not None and 1 <= epochs <= max_epochs]
        complete = [p for p in found if self.complete(p, key)]
        return max(complete, key=lambda p: p.epochs, default=None)

    def publish(self, key: str, epochs: int, checkpoint: str | Path, record: Mapping[str, Any]) -> bool:
        """Publish ``checkpoint`` (a file) as the prefix of ``key`` after ``epochs`` epochs, with
        ``record`` (JSON values) in its marker. Returns False when that prefix was already
        published (by another trial, maybe at the same moment): it is left as it is."""
        target = self.prefix(key, epochs)
        if self.complete(target, key):
            return False
        target.root.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{target.root.name}-", suffix=PARTIAL_SUFFIX, dir=target.root.parent))
        try:
            staged = Prefix(partial, epochs)
            shutil.copyfile(checkpoint, staged.checkpoint)
            _fsync(staged.checkpoint)
            staged.record.write_text(json.dumps({**record, "key": key, "epochs": epochs}, indent=1, default=str))
            _fsync(staged.record)
            _fsync(partial)
            try:
                os.rename(partial, target.root)  # refuses a non-empty target: a published prefix stays
            except OSError:
                if target.root.exists():
                    return False
                raise
            _fsync(target.root.parent)
            return True
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    def clean_incomplete(self) -> list[Path]:
        """Remove what a killed publisher left (``.partial`` folders, prefix folders without a
        valid marker, then key folders left empty); returns the removed prefix and ``.partial``
        folders. Only while no trial publishes (a study's start)."""
        removed = []
        if not self.root.is_dir():
            return removed
        for key_folder in (p for p in self.root.iterdir() if p.is_dir()):
            for path in key_folder.iterdir():
                epochs = _epochs_of(path)
                stale = path.name.endswith(PARTIAL_SUFFIX) or (
                    epochs is not None and not self.complete(Prefix(path, epochs), key_folder.name))
                if stale:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
            if not any(key_folder.iterdir()):
                key_folder.rmdir()
        return removed
