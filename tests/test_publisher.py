"""BatchPublisher on the real broker: a batch's frames are written together, and what arrives is
what a per-message publish would have sent; a refused message fails the batch."""

import pytest
from kombu import Connection, Exchange, Queue

from pipeline.workers.publisher import SEND_BYTES, BatchPublisher, PublishNotConfirmed

pytestmark = pytest.mark.services

EXCHANGE = Exchange("test.publisher", type="direct", durable=True)


def declared(connection: Connection, name: str, **arguments: object) -> Queue:
    queue = Queue(name, EXCHANGE, routing_key=name, durable=True,
                  queue_arguments={"x-queue-type": "quorum", **arguments})
    queue(connection.default_channel).declare()
    return queue


def drain(connection: Connection, queue: Queue, count: int) -> list:
    received = []
    with connection.Consumer([queue], callbacks=[lambda _body, message: received.append(message)],
                             accept=["json"]):
        while len(received) < count:
            connection.drain_events(timeout=10)
    for message in received:
        message.ack()
    return received


def test_a_batch_arrives_whole_in_order_with_every_property(amqp_url: str):
    """More than ``SEND_BYTES`` of frames, so the batch is sent in several writes; bodies given as
    dicts and as JSON bytes, and a header on every message."""
    body = "x" * 8000
    count = 2 * SEND_BYTES // len(body) + 7
    with Connection(amqp_url) as connection:
        a, b = declared(connection, "a"), declared(connection, "b")
        publisher = BatchPublisher(connection)
        sent = publisher.publish(
            [(EXCHANGE.name, "a" if n % 3 else "b", {"n": n, "pad": body} if n % 2 else b'{"n": %d}' % n)
             for n in range(count)], headers={"origin": "test"})
        assert sent == count and publisher.pending == set()
        received = drain(connection, a, count - len(range(0, count, 3))) + drain(connection, b, len(range(0, count, 3)))
    numbers = [m.decode()["n"] for m in received]
    assert numbers == [n for n in range(count) if n % 3] + list(range(0, count, 3))
    assert all(m.decode() == ({"n": n, "pad": body} if n % 2 else {"n": n}) for m, n in zip(received, numbers))
    assert {(m.content_type, m.content_encoding, m.properties["delivery_mode"], m.headers["origin"])
            for m in received} == {("application/json", "utf-8", 2, "test")}


def test_a_message_the_broker_refuses_fails_the_batch(amqp_url: str):
    with Connection(amqp_url) as connection:
        declared(connection, "full", **{"x-queue-type": "classic", "x-max-length": 1, "x-overflow": "reject-publish"})
        publisher = BatchPublisher(connection)
        with pytest.raises(PublishNotConfirmed, match="nacked"):
            publisher.publish([(EXCHANGE.name, "full", {"n": n}) for n in range(3)])
