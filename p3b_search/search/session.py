"""Where what Ray pickles finds the driver's live study again.

Ray pickles the searcher, the scheduler, the stopper and the progress callback into its
experiment state, and on resume ``Tuner.restore`` brings back those copies (it has no public way
to pass new ones). A study folder may have moved between the driver that stopped and ``resume``,
so none of them pickles a :class:`~p3b_search.study.sections.StudyConfig` (its ``output_dir`` is
the folder's absolute path): they hold a :class:`LiveStudy`, which pickles as the study's name.
The driver opens its session (:class:`~p3b_search.search.progress.StudySession`, with the study
loaded from the folder ``resume`` was given) before it builds or restores the Tuner, and the
restored copies read their study, and the callback its session, from it.
"""
from __future__ import annotations

from typing import Any, Protocol

from p3b_search.study.sections import StudyConfig


class Session(Protocol):
    """What this registry needs of a driver's session: the study it runs."""

    study: StudyConfig


#: The live sessions of this driver process, by study name.
_SESSIONS: dict[str, Session] = {}


def open_session(session: Session) -> None:
    """Make ``session`` the live session of its study in this process."""
    _SESSIONS[session.study.name] = session


def close_session(session: Session) -> None:
    if _SESSIONS.get(session.study.name) is session:
        del _SESSIONS[session.study.name]


def live_session(name: str) -> Session:
    """The live session of study ``name`` in this process."""
    try:
        return _SESSIONS[name]
    except KeyError:
        raise RuntimeError(f"no session of study {name!r} is open in this process: the driver opens it "
                           "before it builds or restores the Tuner") from None


class LiveStudy:
    """A study's configuration, for objects Ray pickles: it pickles as the study's name only, and
    once unpickled it is the configuration of the live session of that name (see the module
    docstring)."""

    def __init__(self, study: StudyConfig):
        self.name = study.name
        self._config: StudyConfig | None = study

    @property
    def config(self) -> StudyConfig:
        if self._config is None:
            self._config = live_session(self.name).study
        return self._config

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.name, self._config = state["name"], None


__all__ = ["LiveStudy", "Session", "close_session", "live_session", "open_session"]
