"""The driver's record: resume ends a killed driver's leftover processes by id, never another's."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from p3b_search.search.driver_record import DriverRecord, ProcessId
from p3b_search.study.messages import StudyError
from tests.paths import REPO_ROOT

# a "driver": spawns a long-lived child (its "Ray session"), records both, then waits to be killed
DRIVER = """
import subprocess, sys, time
from pathlib import Path
from p3b_search.search.driver_record import DriverRecord
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
DriverRecord(Path(sys.argv[1])).write(with_ray_session=True)
print(child.pid, flush=True)
time.sleep(120)
"""


def _spawn_driver(path: Path) -> tuple[subprocess.Popen, int]:
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    return driver, int(driver.stdout.readline())


def test_record_names_this_process_and_what_it_spawned(tmp_path):
    record = DriverRecord(tmp_path / "driver.json")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        record.write(with_ray_session=True)
        data = json.loads(record.path.read_text())
        assert data["driver"]["pid"] == os.getpid()
        assert child.pid in [p["pid"] for p in data["ray_session"]]
        record.write(with_ray_session=False)  # a driver joined to a cluster owns no Ray process
        assert json.loads(record.path.read_text())["ray_session"] == []
    finally:
        child.kill()
        child.wait()
    record.remove()
    assert not record.path.exists() and DriverRecord(tmp_path / "driver.json").end_leftovers() == []
    assert record.driver_state() is None  # the last driver ended


def test_a_killed_drivers_orphans_are_ended_by_their_ids(tmp_path):
    record = DriverRecord(tmp_path / "driver.json")
    driver, orphan_pid = _spawn_driver(record.path)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert record.driver_state().startswith(f"driver: running (pid {driver.pid}, started ")
        with pytest.raises(StudyError, match=rf"the study is running \(driver pid {driver.pid}"):
            record.end_leftovers()  # its driver still runs: refused, nothing ended
        assert psutil.pid_exists(orphan_pid)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        assert psutil.Process(orphan_pid).status() != psutil.STATUS_ZOMBIE  # outlived its driver
        assert record.driver_state() == (f"driver: pid {driver.pid} stopped without ending (killed?): continue "
                                         f"with `python search.py resume {tmp_path}`")

        ended = record.end_leftovers()
        assert [p.pid for p in ended] == [orphan_pid]
        deadline = time.monotonic() + 10
        while psutil.pid_exists(orphan_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not psutil.pid_exists(orphan_pid)
        assert bystander.poll() is None  # never recorded, never touched
        assert not record.path.exists()
    finally:
        bystander.kill()
        bystander.wait()
        if psutil.pid_exists(orphan_pid):
            os.kill(orphan_pid, signal.SIGKILL)


def test_a_reused_pid_is_not_the_recorded_process(tmp_path):
    """Same pid, another start time: another process now, left alone."""
    me = psutil.Process()
    assert ProcessId(me.pid, me.create_time()).live_process() is not None
    assert ProcessId(me.pid, me.create_time() - 3600).live_process() is None
    record = DriverRecord(tmp_path / "driver.json")
    record.path.write_text(json.dumps({"host": socket.gethostname(),
                                       "driver": {"pid": me.pid, "started": me.create_time() - 7200, "name": "x"},
                                       "ray_session": [{"pid": me.pid, "started": me.create_time() - 3600}]}))
    assert record.end_leftovers() == []  # we are still alive


def test_another_hosts_driver_is_left_to_that_host(tmp_path):
    record = DriverRecord(tmp_path / "driver.json")
    me = psutil.Process()
    record.path.write_text(json.dumps({"host": "elsewhere.invalid",
                                       "driver": {"pid": me.pid, "started": me.create_time(), "name": "x"},
                                       "ray_session": [{"pid": me.pid, "started": me.create_time()}]}))
    assert record.end_leftovers() == []
    assert record.driver_state() == f"driver: pid {me.pid} on elsewhere.invalid (not visible from this machine)"
