"""Send MLflow calls from a background thread, so a slow or unreachable tracking store never
slows or crashes the trial that produces them.

Calls run in submission order. A call that fails for a transient reason (connection refused,
timeout, 5xx, a busy store: :func:`p3b_search.connection_errors.transient`) stays at the head of
the queue and is retried with backoff (:func:`p3b_search.retry.outage`) until the sender closes;
a call the store rejects for good (bad value, unknown run) is dropped with a warning.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from mlflow import MlflowClient

from p3b_search import retry
from p3b_search.connection_errors import transient
from p3b_search.credentials import redact_secrets
from p3b_search.tracking.client import open_client

logger = logging.getLogger(__name__)

MlflowCall = Callable[[MlflowClient], None]


class BackgroundSender:
    """A daemon thread that runs :data:`MlflowCall` s against one tracking store, in order.

    ``retry_s``: first wait before retrying a transient failure (doubles up to ``max_retry_s``).
    """

    def __init__(self, tracking_uri: str, label: str, retry_s: float = 1.0, max_retry_s: float = 30.0):
        self.tracking_uri = tracking_uri
        self.label = label
        self.retry_s = retry_s
        self.max_retry_s = max_retry_s
        self._queue: queue.Queue[tuple[str, MlflowCall] | None] = queue.Queue()
        self._closing = threading.Event()
        self._pending = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._work, name=f"mlflow-{label}", daemon=True)
        self._thread.start()

    def submit(self, description: str, call: MlflowCall) -> None:
        """Queue ``call``; returns at once. ``description`` names it in warnings."""
        with self._lock:
            self._pending += 1
        self._queue.put((description, call))

    @property
    def pending(self) -> int:
        """Calls queued or in flight."""
        with self._lock:
            return self._pending

    def close(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for the queue to drain, then stop; returns the calls left unsent."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._pending and time.monotonic() < deadline:
                self._idle.wait(timeout=max(0.0, deadline - time.monotonic()))
            left = self._pending
        self._closing.set()
        self._queue.put(None)
        if left:
            logger.warning(
                "MLflow store %s: %d logging calls of %s could not be sent within %.0f s and are lost "
                "(the trial itself is unaffected; its results are also in the study's Parquet files)",
                redact_secrets(self.tracking_uri), left, self.label, timeout_s,
            )
        return left

    def _work(self) -> None:
        client: MlflowClient | None = None
        while True:
            item = self._queue.get()
            if item is None:
                return
            description, call = item
            policy = retry.outage(transient, self.retry_s, self.max_retry_s, closing=self._closing,
                                  on_outage=self._warn_outage)
            try:
                for attempt in policy:
                    with attempt:
                        client = client or open_client(self.tracking_uri)
                        call(client)
                if attempt.retry_state.attempt_number > 1:
                    logger.warning("MLflow store %s reachable again after %.0f s; %s resumes logging",
                                   redact_secrets(self.tracking_uri), attempt.retry_state.seconds_since_start,
                                   self.label)
            except retry.Closed:
                return
            except Exception as error:  # noqa: BLE001  (a logging thread must never die)
                logger.warning("MLflow: dropped %s of %s: %s", description, self.label, _one_line(error))
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()

    def _warn_outage(self, error: BaseException) -> None:
        logger.warning("MLflow store %s unreachable (%s); %s keeps running, its logging calls are buffered "
                       "and retried", redact_secrets(self.tracking_uri), _one_line(error), self.label)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return redact_secrets(f"{type(error).__name__}: {text[0] if text else ''}")[:300]
