"""A trial's checkpoints that the driver accepted, kept by the trial in its own folder.

A single-process trial reports its epochs to Ray Tune without a checkpoint: Ray Tune saves its
experiment state (every trial of the study, so it grows with them) after every checkpoint a
trial registers when old checkpoints are deleted, which made the driver's cost per trial grow
with the number of trials. The trial keeps them instead, under ``trials/<number>/saved/``:

- the objective reports epoch ``k`` with its ``checkpoint/`` folder; the report returns once the
  driver has processed the result and let the trial go on (Ray Tune's function trainables
  report synchronously), so epoch ``k`` then counts as accepted, as a checkpoint Ray had
  registered would;
- the folder is then copied to ``saved/epoch-<k>`` (a temporary name first, then renamed: a
  copy cut short is never taken for a checkpoint) and the older copies are deleted;
- a retried or resumed trial starts from the newest ``saved/epoch-<k>``.

A trial the driver stops (or a driver that dies) never returns from the report of its last
epoch, so that epoch is not saved and a resumed trial trains it again: the semantics of Ray's
registered checkpoints, without Ray's experiment state being written per checkpoint.
"""
from __future__ import annotations

import shutil
from pathlib import Path

SAVED_DIR = "saved"
PREFIX = "epoch-"


class SavedCheckpoints:
    """The accepted checkpoints of one trial, in ``folder`` (a trial folder's ``saved/``)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _saved(self) -> list[tuple[int, Path]]:
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.iterdir():
            if path.name.startswith(PREFIX) and path.name.removeprefix(PREFIX).isdigit():
                found.append((int(path.name.removeprefix(PREFIX)), path))
        return sorted(found)

    def latest(self) -> tuple[int, Path] | None:
        """``(epoch, folder)`` of the newest saved checkpoint (None: none yet)."""
        saved = self._saved()
        return saved[-1] if saved else None

    def save(self, checkpoint: Path, epoch: int) -> Path:
        """Copy the checkpoint folder ``checkpoint`` of ``epoch`` (0-based, over both stages) in,
        then delete the older saved checkpoints and leftovers of copies cut short; returns the copy."""
        target = self.folder / f"{PREFIX}{epoch:05d}"
        partial = self.folder / f".partial-{epoch:05d}"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(checkpoint, partial)
        shutil.rmtree(target, ignore_errors=True)  # a retried trial saving the epoch again
        partial.rename(target)
        for path in self.folder.iterdir():
            if path != target and (path.name.startswith(".partial-") or path.name.startswith(PREFIX)):
                shutil.rmtree(path, ignore_errors=True)
        return target
