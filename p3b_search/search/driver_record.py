"""Which process drives a study, and the processes of the local Ray session it started, by id.

A process id here is the pid *and* the process's start time: a pid alone may meanwhile belong
to another process. The driver writes ``driver.json`` in the study folder when it starts and
again whenever a trial starts (Ray spawns workers as it goes); it removes the file when it ends.
A file still there on ``resume`` was left by a driver that did not end (SIGKILL, power loss):

- that driver still alive (same host, same id): ``resume`` refuses (two drivers must never share
  a study);
- it died: Ray's GCS and raylet died with it (they share its fate) and took the trial workers
  along, but ``ray::DashboardAgent`` and ``ray::RuntimeEnvAgent`` outlive it, orphaned. ``resume``
  ends every recorded process still alive: SIGTERM, then SIGKILL after :data:`GRACE_S`.

Processes are matched by their recorded ids only, never by name, so the Ray sessions of other
studies and users on the same machine are never touched.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import psutil

from p3b_search.study.messages import StudyError

#: Seconds a leftover process gets to exit after SIGTERM before it is SIGKILLed.
GRACE_S = 5.0
#: Start times of one process, as read twice, differ by less than this (s).
SAME_START_S = 0.05


@dataclass(frozen=True)
class ProcessId:
    """One process, for as long as it lives: its pid and start time (s since the epoch)."""

    pid: int
    started: float
    name: str = ""

    @classmethod
    def of(cls, process: psutil.Process) -> "ProcessId":
        return cls(process.pid, process.create_time(), process.name())

    def live_process(self) -> psutil.Process | None:
        """The live process with this id (None: it ended, or its pid now belongs to another)."""
        try:
            process = psutil.Process(self.pid)
            if abs(process.create_time() - self.started) < SAME_START_S and process.status() != psutil.STATUS_ZOMBIE:
                return process
        except psutil.Error:
            pass
        return None

    def describe(self) -> str:
        return f"{self.name or '?'} (pid {self.pid})"


@dataclass(frozen=True)
class DriverRecord:
    """``driver.json`` of one study folder (see the module docstring)."""

    path: Path

    def write(self, with_ray_session: bool) -> None:
        """Record this process as the study's driver and, ``with_ray_session`` (it started local
        Ray), every process it has spawned so far. Written atomically."""
        driver = psutil.Process()
        session = [ProcessId.of(p) for p in _descendants(driver)] if with_ray_session else []
        data = {"host": socket.gethostname(), "driver": asdict(ProcessId.of(driver)),
                "ray_session": [asdict(p) for p in session]}
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        partial.write_text(json.dumps(data, indent=1))
        partial.replace(self.path)

    def remove(self) -> None:
        """The driver ended and took its Ray session down: nothing left to end."""
        self.path.unlink(missing_ok=True)

    def _read(self) -> tuple[str, ProcessId, list[ProcessId]] | None:
        """The recorded host, driver and Ray session (None: no record)."""
        if not self.path.exists():
            return None
        data = json.loads(self.path.read_text())
        return data["host"], ProcessId(**data["driver"]), [ProcessId(**entry) for entry in data["ray_session"]]

    def driver_state(self) -> str | None:
        """One line on the recorded driver: running, stopped without ending, or on another host
        (None: no driver left a record, i.e. the last one ended)."""
        record = self._read()
        if record is None:
            return None
        host, driver, _ = record
        if host != socket.gethostname():
            return f"driver: pid {driver.pid} on {host} (not visible from this machine)"
        if driver.live_process() is not None:
            return f"driver: running (pid {driver.pid}, started {_clock(driver.started)})"
        return (f"driver: pid {driver.pid} stopped without ending (killed?): continue with "
                f"`python search.py resume {self.path.parent}`")

    def end_leftovers(self) -> list[ProcessId]:
        """End the recorded Ray processes of a driver that did not end (the ids it ended; empty
        without a record). A :class:`StudyError` when the recorded driver still runs."""
        record = self._read()
        if record is None:
            return []
        host, driver, session = record
        if host != socket.gethostname():
            return []  # another machine's processes: neither visible nor ours to end
        if driver.live_process() is not None:
            raise StudyError(f"{self.path.parent}: the study is running (driver pid {driver.pid}, started "
                             f"{_clock(driver.started)}): wait for it, or stop it (Ctrl-C) before resuming")
        leftovers = {p: live for p in session if (live := p.live_process()) is not None}
        _end(list(leftovers.values()))
        self.remove()
        return list(leftovers)


def _clock(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _descendants(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.Error:
        return []


def _end(processes: list[psutil.Process]) -> None:
    """SIGTERM ``processes``, then SIGKILL those still alive after :data:`GRACE_S`."""
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=GRACE_S)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=GRACE_S)


__all__ = ["DriverRecord", "ProcessId"]
