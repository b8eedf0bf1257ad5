"""A small client of the bus contract, for services that publish events and for compute hosts.

Publishing (any service, as the broker user ``bindpipe-publisher``)::

    from pipeline.client import BindingClient

    with BindingClient("amqp://bindpipe-publisher:…@rabbit:5672/bindpipe") as client:
        with client.results_for("compute-7") as results:        # listen before publishing
            envelope = client.publish("port.create", {"id": "p1", "network_id": "net-1",
                                                      "host": "compute-7", "vnic_type": "normal"})
            result = results.wait(port_id="p1", event_id=envelope.event_id, timeout=30)
        print(result["vif_type"], result["vif_details"])

A compute host consumes its own durable queue (``binding.results.<host>``), as its own broker user
(``bindpipe-compute.<host>``, made by ``bindpipe broker add-compute-host``)::

    with BindingClient("amqp://bindpipe-compute.compute-7:…@rabbit:5672/bindpipe") as client:
        for result in client.watch("compute-7"):                # acked once the loop body returns
            plug(result)

Results carry a ``seq``; a result may arrive twice (an outbox relay after a crash, a replay) but
always with the same ``seq`` and body, so a consumer drops a ``seq`` it has already applied.
"""

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from kombu import Connection, Queue

from pipeline.models.binding import RequestContext
from pipeline.models.events import Envelope
from pipeline.settings import Settings
from pipeline.workers.publisher import BatchPublisher, connect_with_retry
from pipeline.workers.signing import event_publisher
from pipeline.workers.topology import EVENTS, RESULTS_PASSIVE, existing_results_queue, host_routing_key


class ResultTimeout(TimeoutError):
    """No matching result arrived in time."""


class ResultStream:
    """Results for one host on a private queue that exists only while the stream is open (named
    ``bindpipe.client.…``: the only queues the publisher's broker user may declare)."""

    def __init__(self, connection: Connection, host: str):
        queue = Queue(f"bindpipe.client.{host}.{uuid.uuid4().hex[:12]}", RESULTS_PASSIVE,
                      routing_key=host_routing_key(host), exclusive=True, auto_delete=True)
        self.simple = connection.SimpleQueue(queue, no_ack=True)
        self.seen: list[dict[str, Any]] = []

    def wait(self, port_id: str | None = None, event_id: Any = None, timeout: float = 30.0) -> dict[str, Any]:
        """The first result matching ``port_id`` and/or ``event_id`` (all that arrive are kept in ``seen``)."""
        for body in self.seen:
            if _matches(body, port_id, event_id):
                return body
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                body = self.simple.get(block=True, timeout=remaining).decode()
            except self.simple.Empty:
                break
            self.seen.append(body)
            if _matches(body, port_id, event_id):
                return body
        raise ResultTimeout(f"no result for port {port_id} / event {event_id} within {timeout}s")

    def close(self) -> None:
        self.simple.close()


def _matches(body: dict[str, Any], port_id: str | None, event_id: Any) -> bool:
    return ((port_id is None or body.get("port_id") == port_id)
            and (event_id is None or body.get("event_id") == str(event_id)))


class BindingClient:
    def __init__(self, broker_url: str | None = None, context: RequestContext | None = None,
                 settings: Settings | None = None):
        settings = settings or Settings()
        self.connection = Connection(broker_url or settings.broker_url, heartbeat=settings.heartbeat,
                                     ssl=settings.broker_ssl_options(), transport_options={"polling_interval": 0.001})
        self.settings = settings
        self.context = context or RequestContext.service()
        self._publisher: BatchPublisher | None = None

    def __enter__(self) -> "BindingClient":
        connect_with_retry(self.connection, max_seconds=30)
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self._publisher is not None:
            self._publisher.close()
        self.connection.release()

    @property
    def publisher(self) -> BatchPublisher:
        if self._publisher is None:
            self._publisher = event_publisher(self.connection, self.settings)
        return self._publisher

    def envelope(self, event_type: str, payload: dict[str, Any], *, event_id: uuid.UUID | None = None,
                 occurred_at: datetime | None = None, context: RequestContext | None = None) -> Envelope:
        return Envelope(event_id=event_id or uuid.uuid4(), event_type=event_type,
                        occurred_at=occurred_at or datetime.now(UTC), context=context or self.context,
                        payload=payload)

    def publish(self, event_type: str, payload: dict[str, Any], **fields: Any) -> Envelope:
        """Publish one event (persistent, confirmed by the broker); the envelope sent."""
        envelope = self.envelope(event_type, payload, **fields)
        self.publish_envelopes([envelope])
        return envelope

    def publish_envelopes(self, envelopes: list[Envelope]) -> None:
        """Publish many events with one wait for the broker's confirms."""
        self.publisher.publish((EVENTS.name, e.event_type, e.model_dump_json().encode()) for e in envelopes)

    @contextmanager
    def results_for(self, host: str) -> Iterator[ResultStream]:
        stream = ResultStream(self.connection, host)
        try:
            yield stream
        finally:
            stream.close()

    def watch(self, host: str, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """The host's durable result queue, in order; each message is acked once the caller asks
        for the next one. Stops after ``timeout`` seconds without a message (None: never)."""
        simple = self.connection.SimpleQueue(existing_results_queue(self.connection, host, self.settings),
                                             no_ack=False)
        try:
            while True:
                try:
                    message = simple.get(block=True, timeout=timeout)
                except simple.Empty:
                    return
                yield message.decode()
                message.ack()
        finally:
            simple.close()


__all__ = ["BindingClient", "ResultStream", "ResultTimeout"]
