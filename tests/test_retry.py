"""Which store errors are worth another call (p3b_search.connection_errors), and the retry
policies that make those calls (p3b_search.retry), on the real exception types of Optuna,
SQLAlchemy, requests and MLflow."""
from __future__ import annotations

import threading
import time

import pytest
import requests
from mlflow.exceptions import MlflowException, RestException
from optuna.exceptions import StorageInternalError
from sqlalchemy.exc import OperationalError

from p3b_search import retry
from p3b_search.connection_errors import causes, creation_race, refused, transient, unreachable


def raised(make, cause: BaseException | None = None, within: BaseException | None = None) -> BaseException:
    """``make()`` raised ``from cause``, or while handling ``within``; returns what was raised."""
    try:
        if within is not None:
            try:
                raise within
            except BaseException:
                raise make()
        raise make() from cause
    except BaseException as error:  # noqa: BLE001
        return error


def test_a_dropped_database_connection_is_found_through_optunas_and_sqlalchemys_wrapping():
    dropped = OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
    error = raised(lambda: StorageInternalError("An exception is raised during the commit."), cause=dropped)
    assert unreachable(error) is dropped
    assert list(causes(error))[:2] == [error, dropped]
    assert unreachable(raised(lambda: StorageInternalError("value too long for column"))) is None
    hidden = raised(lambda: StorageInternalError("failed"), cause=None, within=ConnectionRefusedError())
    assert isinstance(unreachable(hidden), ConnectionRefusedError)  # raised while handling it
    try:
        try:
            raise ConnectionRefusedError()
        except ConnectionRefusedError:
            raise StorageInternalError("failed") from None
    except StorageInternalError as error:
        assert unreachable(error) is None  # `from None` ends the chain


def test_mlflow_errors_are_judged_by_their_code_not_by_the_keys_their_text_quotes():
    down = raised(lambda: MlflowException("API request to http://127.0.0.1:1/api failed with exception ..."),
                  within=requests.ConnectionError("Max retries exceeded (Caused by NewConnectionError: "
                                                  "Failed to establish a new connection: Connection refused)"))
    assert transient(down) and unreachable(down) is not None and not refused(down)
    busy = RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "database is locked"})
    assert transient(busy) and not refused(busy)
    rejected = MlflowException.invalid_parameter_value("Changing param values is not allowed: key='timeout_lost'")
    assert not transient(rejected) and unreachable(rejected) is None
    denied = RestException({"error_code": "PERMISSION_DENIED", "message": "bob may not write experiment 1"})
    assert refused(denied) and not transient(denied)
    assert transient(requests.Timeout("read timed out")) and transient(PermissionError()) and refused(PermissionError())


def test_a_schema_creation_race_is_told_from_other_failures():
    assert creation_race(raised(lambda: OperationalError("CREATE TABLE studies", {}, Exception(
        'relation "studies" already exists'))))
    assert creation_race(RuntimeError('duplicate key value violates unique constraint "version_info_pkey"'))
    assert not creation_race(ValueError("no such host"))


def failing(error: BaseException, times: int | None = None, calls: list | None = None):
    """A call that raises ``error`` (the first ``times`` calls; None: always), counting into ``calls``."""
    calls = [] if calls is None else calls

    def call() -> str:
        calls.append(1)
        if times is None or len(calls) <= times:
            raise error
        return "answered"
    return call


def test_an_outage_is_waited_out_with_a_growing_wait_and_warned_once(monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(time, "sleep", waits.append)
    outages: list[BaseException] = []
    calls: list = []
    policy = retry.outage(lambda error: unreachable(error) is not None, 0.5, 8.0, patience_s=120.0,
                          on_outage=outages.append)
    assert policy(failing(ConnectionRefusedError("down"), times=6, calls=calls)) == "answered"
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0] and len(calls) == 7
    assert len(outages) == 1 and isinstance(outages[0], ConnectionRefusedError)
    calls.clear()
    with pytest.raises(ValueError):  # an error the policy does not retry: raised at once
        retry.outage(lambda error: False, 0.5, 8.0)(failing(ValueError("bad"), calls=calls))
    assert len(calls) == 1


def test_closing_ends_a_wait_at_once():
    closing = threading.Event()
    threading.Timer(0.2, closing.set).start()
    began = time.monotonic()
    with pytest.raises(retry.Closed):
        retry.outage(lambda error: True, 30.0, 30.0, closing=closing)(failing(OSError("down")))
    assert time.monotonic() - began < 10


def test_opening_a_store_being_created_gives_up_after_its_attempts(monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    heard: list[BaseException] = []
    calls: list = []
    with pytest.raises(RuntimeError, match="already exists"):
        retry.creation(creation_race, heard.append)(failing(RuntimeError('relation "studies" already exists'),
                                                            calls=calls))
    assert len(calls) == retry.CREATION_ATTEMPTS and len(heard) == retry.CREATION_ATTEMPTS - 1
