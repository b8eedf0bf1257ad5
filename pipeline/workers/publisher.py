"""Publishing a batch with one wait for the broker's confirms, and connecting with retries.

py-amqp's ``confirm_publish`` waits for each message's confirm in turn: one round trip per message.
Here the channel is put in confirm mode once, a whole batch is published, and the worker waits
for the broker's (cumulative) acks of all of it: one round trip per batch. A nack or a timeout
raises, and the batch is not acked to its source queue, so nothing is lost (downstream stages
recognise a re-published message by its stage mark).
"""

import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson
import structlog
from kombu import Connection, Producer
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

log = structlog.get_logger(__name__)


class PublishNotConfirmed(Exception):
    """The broker nacked a message of the batch, or did not confirm it in time."""


class BatchPublisher:
    def __init__(self, connection: Connection, confirm_timeout: float = 10.0,
                 sign: Callable[[bytes], dict[str, Any] | None] | None = None):
        """``sign``: headers that sign a body (see ``pipeline.workers.signing``), for event publishers."""
        self.connection = connection
        self.sign = sign
        self.channel = connection.channel()
        self.producer = Producer(self.channel)
        self.confirm_timeout = confirm_timeout
        self.confirms = hasattr(self.channel, "confirm_select")  # py-amqp; the memory transport has none
        self.sent = 0
        self.pending: set[int] = set()  # delivery tags not yet confirmed
        self.nacked = False
        if self.confirms:
            self.channel.confirm_select()
            self.channel.events["basic_ack"].add(self._on_ack)
            self.channel.events["basic_nack"].add(self._on_nack)

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        if multiple:
            self.pending = {tag for tag in self.pending if tag > delivery_tag}
        else:
            self.pending.discard(delivery_tag)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._on_ack(delivery_tag, multiple)
        self.nacked = True

    def publish(self, messages: Iterable[tuple[str, str, dict[str, Any] | bytes]],
                headers: dict[str, Any] | None = None) -> int:
        """Publish ``(exchange, routing_key, body)`` persistently; return once all are confirmed.
        A ``bytes`` body is JSON already."""
        count = 0
        for exchange, routing_key, body in messages:
            self.sent += 1
            if self.confirms:
                self.pending.add(self.sent)  # before publishing: its ack may be read while we publish
            data = body if isinstance(body, bytes) else orjson.dumps(body)
            signed = self.sign(data) if self.sign else None
            self.producer.publish(data, exchange=exchange, routing_key=routing_key,
                                  content_type="application/json", content_encoding="utf-8",
                                  delivery_mode=2, headers={**(headers or {}), **(signed or {})} or None)
            count += 1
        if self.confirms and count:
            self._wait_for_confirms()
        return count

    def _wait_for_confirms(self) -> None:
        deadline = time.monotonic() + self.confirm_timeout
        while self.pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishNotConfirmed(f"{len(self.pending)} messages unconfirmed after {self.confirm_timeout}s")
            try:
                self.connection.drain_events(timeout=min(remaining, 1.0))
            except TimeoutError:
                self.connection.heartbeat_check()
        if self.nacked:
            self.nacked = False
            raise PublishNotConfirmed("the broker refused (nacked) a message of the batch")

    def close(self) -> None:
        try:
            self.channel.close()
        except Exception:  # noqa: BLE001 - closing a channel of a dead connection
            pass


def connect_with_retry(connection: Connection, max_seconds: float = 300.0) -> Connection:
    """Connect, retrying with exponential backoff and jitter (a broker restart takes seconds)."""
    for attempt in Retrying(retry=retry_if_exception_type(tuple(connection.recoverable_connection_errors)
                                                           + tuple(connection.connection_errors) + (OSError,)),
                            wait=wait_exponential_jitter(multiplier=0.2, max=5.0), stop=stop_after_delay(max_seconds),
                            reraise=True,
                            before_sleep=lambda s: log.warning("broker connection failed, retrying",
                                                               attempt=s.attempt_number,
                                                               error=str(s.outcome.exception())[:200])):
        with attempt:
            connection.connect()
    return connection
