"""The buffered AMQP frame reader, fed through a socket pair in awkward pieces."""

import socket
from struct import pack

import pytest
from amqp.exceptions import UnexpectedFrame

from pipeline.workers.frames import RECV_BYTES, FrameReader


def frame(frame_type: int, channel: int, payload: bytes, end: int = 206) -> bytes:
    return pack(">BHI", frame_type, channel, len(payload)) + payload + bytes([end])


class FakeTransport:
    """What the reader uses of py-amqp's TCPTransport."""

    def __init__(self, sock: socket.socket, read_ahead: bytes = b""):
        self.sock, self._read_buffer, self.raise_on_initial_eintr, self.connected = sock, read_ahead, True, True


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    ours.settimeout(0.2)
    yield ours, theirs
    ours.close()
    theirs.close()


def test_many_frames_in_one_write_and_read_ahead_bytes_come_out_in_order(pair) -> None:
    ours, theirs = pair
    frames = [frame(1, 1, b"method"), frame(2, 1, b"header"), frame(3, 1, b"x" * 3000), frame(8, 0, b"")]
    wire = b"".join(frames)
    reader = FrameReader(FakeTransport(ours, read_ahead=wire[:5]))  # py-amqp had read 5 bytes already
    theirs.sendall(wire[5:])
    assert [reader.read_frame() for _ in frames] == [(1, 1, b"method"), (2, 1, b"header"), (3, 1, b"x" * 3000),
                                                      (8, 0, b"")]


def test_a_timeout_in_the_middle_of_a_frame_loses_nothing(pair) -> None:
    ours, theirs = pair
    reader = FrameReader(FakeTransport(ours))
    wire = frame(3, 2, b"body" * 100)
    theirs.sendall(wire[:3])  # not even a whole header
    with pytest.raises(socket.timeout):
        reader.read_frame()
    theirs.sendall(wire[3:50])  # a header, part of the payload
    with pytest.raises(socket.timeout):
        reader.read_frame()
    theirs.sendall(wire[50:] + frame(1, 2, b"next"))
    assert reader.read_frame() == (3, 2, b"body" * 100)
    assert reader.read_frame() == (1, 2, b"next")


def test_frames_larger_than_one_read_and_a_long_stream(pair) -> None:
    ours, theirs = pair
    reader = FrameReader(FakeTransport(ours))
    big = bytes(range(256)) * (3 * RECV_BYTES // 256)
    theirs.sendall(frame(3, 1, big))
    assert reader.read_frame() == (3, 1, big)
    payloads = [str(i).encode() * (i % 50) for i in range(2000)]
    theirs.setblocking(False)
    sent = b"".join(frame(3, 1, p) for p in payloads)
    got = []
    while len(got) < len(payloads):
        if sent:
            try:
                sent = sent[theirs.send(sent[:4096]):]
            except BlockingIOError:
                pass
        try:
            got.append(reader.read_frame()[2])
        except socket.timeout:
            continue
    assert got == payloads
    assert reader.position <= len(reader.buffer) < RECV_BYTES + 4096  # the buffer is compacted as it goes


def test_a_bad_frame_end_and_a_closed_connection_are_errors(pair) -> None:
    ours, theirs = pair
    transport = FakeTransport(ours)
    reader = FrameReader(transport)
    theirs.sendall(frame(1, 1, b"oops", end=0))
    with pytest.raises(UnexpectedFrame):
        reader.read_frame()
    theirs.close()
    with pytest.raises(OSError, match="closed"):
        reader.read_frame()
    assert transport.connected is False


def test_worker_connections_read_frames_through_the_buffer_on_rabbitmq(amqp_url: str) -> None:
    """On the real broker: a connection made as the workers make theirs has the reader, and a few
    thousand messages of mixed sizes, published with confirms, come back whole and in order."""
    from kombu import Connection, Consumer, Queue

    from pipeline.workers.publisher import BatchPublisher, connect_with_retry

    bodies = [b'{"n":%d,"pad":"%s"}' % (i, b"p" * (i * 37 % 5000)) for i in range(3000)]
    with Connection(amqp_url) as connection, Connection(amqp_url) as producing:
        connect_with_retry(connection)
        assert isinstance(connection.connection.transport.read_frame.__self__, FrameReader)
        assert "blocking_read" in vars(connection.connection)  # buffered frames skip the socket's timeout
        queue = Queue("frames-test", durable=False)
        queue(connection.default_channel).declare()
        publisher = BatchPublisher(producing)
        assert isinstance(producing.connection.transport.read_frame.__self__, FrameReader)
        publisher.publish(("", "frames-test", body) for body in bodies)  # returns once all are confirmed
        received: list[bytes] = []
        with Consumer(connection, [queue], accept=None, prefetch_count=500,
                      on_message=lambda m: (received.append(m.body), m.ack())):
            while len(received) < len(bodies):
                connection.drain_events(timeout=5)
        assert received == [body.decode() for body in bodies]  # utf-8 JSON: py-amqp hands over text


def test_a_whole_buffered_frame_is_taken_without_the_socket(pair) -> None:
    ours, theirs = pair
    reader = FrameReader(FakeTransport(ours))
    assert reader.buffered_frame() is None
    theirs.sendall(frame(1, 1, b"one") + frame(2, 1, b"two")[:9])
    assert reader.read_frame() == (1, 1, b"one")  # reads all that was sent
    assert reader.buffered_frame() is None  # "two" is not whole yet: nothing taken
    theirs.sendall(frame(2, 1, b"two")[9:])
    assert reader.buffered_frame() is None  # only the socket has the rest
    assert reader.read_frame() == (2, 1, b"two")


@pytest.mark.parametrize("size", [0, 1, 1200, 131072 - 100, 131072 - 8, 131072, 3 * 131072 + 5])
def test_publish_frames_are_the_bytes_py_amqp_writes(size: int) -> None:
    """The publisher's frames from parts made once equal py-amqp's frame writer's, byte for byte,
    for a body that fits one frame, one that only just does or does not, and one of several."""
    from amqp import Message, spec
    from amqp.method_framing import frame_writer
    from amqp.serialization import dumps

    from pipeline.workers.publisher import PROPERTIES, _Frames, publish_frames

    class Connection:
        frame_max, bytes_sent = 131072, 0

    written = _Frames()
    body = bytes(i % 251 for i in range(size))
    frame_writer(Connection(), written)(1, 3, spec.Basic.Publish,
                                        dumps("Bssbb", (0, "binding.results", "host.compute-7", False, False)),
                                        Message(body, **PROPERTIES))
    assert publish_frames(3, 131072, "binding.results", "host.compute-7", body) == written.take()
