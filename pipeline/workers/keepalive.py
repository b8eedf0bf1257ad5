"""Heartbeats for a worker's broker connections while it waits on the database.

py-amqp sends heartbeats only when the worker's loop turns. A transaction that waits on an
unreachable database (a network that drops packets answers nothing, for minutes) would stop the
loop, RabbitMQ would close the connection after two missed heartbeats, and every delivery in hand
would go back to its queue, each return counted against the message's delivery limit. While the
worker waits on the database, a thread of its own sends the heartbeats instead.

The worker touches the broker only outside ``waiting()`` and the thread only inside it, under one
lock, so the two never write to a socket at the same time.
"""

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import structlog

log = structlog.get_logger(__name__)


class KeepAlive:
    def __init__(self, connections: Callable[[], list[Any]], heartbeat: float):
        """``connections``: the py-amqp connections to keep alive (looked up at each beat)."""
        self.connections, self.every = connections, max(heartbeat / 3, 0.5)
        self.lock = threading.Lock()
        self.since: float | None = None  # when the wait in hand began
        self.beats = 0
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.enabled = heartbeat > 0

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Around work that touches only the database: the broker connections are the thread's meanwhile."""
        if not self.enabled:
            yield
            return
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="bindpipe-keepalive", daemon=True)
            self.thread.start()
        with self.lock:
            self.since = time.monotonic()
        try:
            yield
        finally:
            with self.lock:  # waits for a heartbeat being sent: the worker's next write comes after it
                self.since = None

    def _run(self) -> None:
        while not self.stopped.wait(self.every):
            with self.lock:
                if self.since is None or time.monotonic() - self.since < self.every:
                    continue
                for connection in self.connections():
                    try:
                        connection.send_heartbeat()
                        self.beats += 1
                    except Exception as exc:  # noqa: BLE001 - the worker's loop finds a dead connection itself
                        log.debug("heartbeat not sent", error=str(exc)[:200])

    def stop(self) -> None:
        self.stopped.set()
