"""The files of a trial's working folder: what the objective writes and export reads.

This module is the contract between an objective (``--objective``) and ``search.py export``:
an objective that writes its trial folder through :class:`TrialFolder` can be exported.
Layout, under the folder the runner gives the trial (``trials/<number>/``)::

    checkpoint/            full-state checkpoint of the last epoch (reported to the runner)
        trial_state.json   {"stage": "prune" | "finetune"}
        pruned/            the pruned architecture once the prune stage ended (a ModelFolder
                           without weights: they are in the checkpoint)
    model/                 the final model (a ModelFolder)
    result.json            {"state": "finished", "objectives": {...}, "config": {...}}

A :class:`ModelFolder` (a trial's ``model/``, or an exported folder) holds ``arch.json``
(:class:`~p3b_search.surgery.ArchSpec`), ``model.safetensors`` (the weights) and, for
unstructured results only, ``weight_masks.safetensors`` (parameter name -> bool, True = kept).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ARCH_FILE = "arch.json"
WEIGHTS_FILE = "model.safetensors"
MASKS_FILE = "weight_masks.safetensors"
CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trial_state.json"
PRUNED_DIR = "pruned"
MODEL_DIR = "model"
RESULT_FILE = "result.json"
#: ``state`` of ``result.json`` once the fine-tune stage ended and ``model/`` is complete.
FINISHED = "finished"


@dataclass(frozen=True)
class ModelFolder:
    """A folder holding one pruned model: architecture, weights, unstructured zero patterns."""

    root: Path

    @property
    def arch(self) -> Path:
        return self.root / ARCH_FILE

    @property
    def weights(self) -> Path:
        return self.root / WEIGHTS_FILE

    @property
    def masks(self) -> Path:
        return self.root / MASKS_FILE


@dataclass(frozen=True)
class CheckpointFolder:
    """A trial's ``checkpoint/`` (or a copy of it): the last epoch's full state, its stage, and
    the pruned architecture once the prune stage ended."""

    root: Path

    @property
    def stage_file(self) -> Path:
        """``trial_state.json``: the stage the checkpoint belongs to."""
        return self.root / STATE_FILE

    @property
    def pruned(self) -> ModelFolder:
        """``pruned/``: the pruned architecture (its weights are in the checkpoint)."""
        return ModelFolder(self.root / PRUNED_DIR)


@dataclass(frozen=True)
class TrialFolder:
    """The working folder of one trial (see the module docstring for its layout)."""

    root: Path

    @property
    def checkpoint(self) -> CheckpointFolder:
        """``checkpoint/``: what a resumed trial starts from."""
        return CheckpointFolder(self.root / CHECKPOINT_DIR)

    @property
    def model(self) -> ModelFolder:
        """``model/``: the final fine-tuned model."""
        return ModelFolder(self.root / MODEL_DIR)

    @property
    def result(self) -> Path:
        """``result.json``: state, objectives and trial config."""
        return self.root / RESULT_FILE
