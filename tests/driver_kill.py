"""Run ``search.py`` as a driver that SIGKILLs itself at one moment of one trial's life.

    python -m tests.driver_kill MOMENT TRIAL search.py-arguments...

The kill is a real ``SIGKILL`` of the driver process (no handler runs, nothing is flushed), as
the OOM killer or a lost machine would leave a study. The moments of trial number ``TRIAL``
(see :data:`MOMENTS`):

- ``sampling``: Optuna asked for it and stored its first parameter; the others are not sampled;
- ``asked``: fully sampled and handed to Ray Tune, which has not recorded the trial yet;
- ``started``: Ray started it (``on_trial_start``), before it reported anything;
- ``reporting``: Ray received its epoch-1 result (``on_trial_result``), before the checkpoint of
  that epoch was registered;
- ``finishing``: its final result was told to Optuna (COMPLETE) and the driver is about to
  record its end (before the ``on_trial_complete`` callback and Ray's next state save).

And for a study with a ``scheduler`` (see :data:`SCHEDULER_MOMENTS`):

- ``at-rung``: Ray received its result of a rung's epoch (its learning-curve row is written)
  and the successive-halving scheduler is about to decide whether it continues.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Any, Callable

import optuna

from p3b_search.search.progress import StudyProgress
from p3b_search.search.searcher import FrontSafeOptunaSearch
from p3b_search.search.successive_halving import SuccessiveHalvingScheduler
from p3b_search.search.trainable import TRIAL_NUMBER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_after(cls: type, name: str, is_moment: Callable[..., bool]) -> None:
    """Patch ``cls.name`` to SIGKILL the process once a call returned and
    ``is_moment(result, self, *args, **kwargs)`` holds."""
    original = getattr(cls, name)

    def patched(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        if is_moment(result, self, *args, **kwargs):
            _die()
        return result

    setattr(cls, name, patched)


def _kill_before(cls: type, name: str, is_moment: Callable[..., bool]) -> None:
    """Patch ``cls.name`` to SIGKILL the process when it is called with ``is_moment(self, *args,
    **kwargs)`` true, before it runs."""
    original = getattr(cls, name)

    def patched(self: Any, *args: Any, **kwargs: Any) -> Any:
        if is_moment(self, *args, **kwargs):
            _die()
        return original(self, *args, **kwargs)

    setattr(cls, name, patched)


def _number(trial: Any) -> int | None:
    """The Optuna number of a Ray Tune trial."""
    return (trial.config or {}).get(TRIAL_NUMBER)


def _arm(moment: str, number: int) -> None:
    if moment == "sampling":
        _kill_after(optuna.Trial, "suggest_float", lambda value, trial, *a, **k: trial.number == number)
    elif moment == "asked":
        _kill_after(FrontSafeOptunaSearch, "suggest",
                    lambda config, searcher, *a, **k: bool(config) and config[TRIAL_NUMBER] == number)
    elif moment == "started":
        _kill_after(StudyProgress, "on_trial_start",
                    lambda _, callback, iteration, trials, trial, **k: _number(trial) == number)
    elif moment == "reporting":
        _kill_after(StudyProgress, "on_trial_result",
                    lambda _, callback, iteration, trials, trial, result, **k:
                    _number(trial) == number and result.get("epoch") == 1)
    elif moment == "finishing":
        _kill_before(StudyProgress, "on_trial_complete",
                     lambda callback, iteration, trials, trial, **k: _number(trial) == number)
    elif moment == "at-rung":
        _kill_before(SuccessiveHalvingScheduler, "on_trial_result",
                     lambda scheduler, controller, trial, result: _number(trial) == number
                     and int(result.get("epoch", -1)) + 1 in scheduler.rungs)
    else:
        raise SystemExit(f"moment {moment!r}: choose one of {', '.join(MOMENTS + SCHEDULER_MOMENTS)}")


#: Moments of any trial's life; a study with a scheduler has more (SCHEDULER_MOMENTS).
MOMENTS = ("sampling", "asked", "started", "reporting", "finishing")
SCHEDULER_MOMENTS = ("at-rung",)


def killing(command: list[str], moment: str, number: int) -> list[str]:
    """``command`` (``[python, search.py, arguments...]``) run by this harness instead, killed at
    ``moment`` of trial ``number``."""
    python, _, *arguments = command
    return [python, "-m", "tests.driver_kill", moment, str(number), *arguments]


def main(argv: list[str]) -> int:
    moment, number, *arguments = argv
    _arm(moment, int(number))
    sys.path.insert(0, ROOT)
    import search

    return search.main(arguments)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
