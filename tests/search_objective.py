"""A small real objective for runner tests: an MLP on scikit-learn's digits, pruned.

Same contract as ``objectives.prune_finetune.run_trial``: the prune stage trains the MLP and
reports per-epoch allocation rows (the keep ratio of its hidden layer, ramping to
``1 - prune_ratio``); then the hidden units with the smallest weight L1 norms are removed (the
model is physically smaller) and the fine-tune stage trains the rest at ``2 * alpha`` times
its learning rate (``alpha`` = 0: no fine-tuning, a hopeless trial for early stopping).
It reads ``prune_ratio`` and ``alpha`` of the trial's method config (P3B's knobs; ``alpha`` is
0.5 for a method without it) and reports ``kept_fraction`` = kept / dense parameters. Every
epoch reports ``top1``, ``macs``, ``kept_params`` and ``keep_ratio`` (kept / dense parameters)
as the shipped objective does: in the prune stage those of the model the epoch's keep ratio
would shrink to (a gated method's masks), in the fine-tune stage the pruned model's.
Full-state checkpoints each epoch; ``resume_from`` continues after the checkpointed epoch.

The checkpoint holds the model, the optimizer and the RNG state, so a resumed trial ends
exactly as an undisturbed one with the same seed. A non-finite training loss raises
``FloatingPointError`` (as the training loop does).

Test controls, read from the study folder (``workdir/../..``): ``epoch-seconds`` (sleep per
epoch, to keep trials running while a test interrupts them), ``fail-once-<number>``
(raise once after the second epoch, to exercise retries) and ``oom-<number>`` (raise
``torch.OutOfMemoryError`` in the first epoch, as a too-large batch on a GPU would).
Every epoch trained is appended to ``workdir/epochs.log``; the process id of the latest
attempt is in ``workdir/pid``. Each attempt also appends ``<trial> <pid> <event> <time>``
lines (events ``start``, ``epoch``, ``end``) to the study folder's ``attempts.log``: when each
attempt ran, for tests that count the trials running at once.

The training itself is in :mod:`tests.search_objective_training`, imported when a trial runs:
the study driver imports this module (``--objective``) and stays without torch, as a user's
objective should keep it (README, "Adding a method").
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from p3b_search.config import TrialConfig
    from p3b_search.reporting import TrialReporter


def most_running(study_root: Path) -> int:
    """The most trial attempts that ran at once, from ``attempts.log`` (an attempt runs from its
    ``start`` to its last line: a killed worker writes no ``end``)."""
    spans: dict[tuple[str, str, int], list[float]] = {}
    starts: dict[tuple[str, str], int] = defaultdict(int)
    for line in (Path(study_root) / "attempts.log").read_text().splitlines():
        trial, pid, event, at = line.split()
        if event == "start":
            starts[trial, pid] += 1
        spans.setdefault((trial, pid, starts[trial, pid]), [float(at), float(at)])[1] = float(at)
    # at equal times an attempt that starts counts before one that ends
    events = sorted([(start, 1) for start, _ in spans.values()] + [(end, -1) for _, end in spans.values()],
                    key=lambda event: (event[0], -event[1]))
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def run_trial(config: TrialConfig, reporter: TrialReporter, workdir: Path,
              resume_from: Path | None = None) -> dict[str, float]:
    """The objective (``--objective tests.search_objective:run_trial``): one trial, as described above."""
    from tests.search_objective_training import train_trial

    return train_trial(config, reporter, workdir, resume_from)
