"""Buffered reading of AMQP frames from RabbitMQ.

py-amqp reads each frame with two ``recv`` calls of exactly the bytes it needs (the 7-byte header,
then the payload and the frame-end octet), so a delivery (method, header and body frames) costs
six system calls, each through Python. Here a transport reads up to ``RECV_BYTES`` at a time into
a buffer and frames are cut out of it: for a stream of small messages, one system call serves
dozens of them. A frame is only taken once it is whole, so a timeout in the middle of one leaves
everything in the buffer for the next read, as py-amqp's own reader does.

The connection's ``blocking_read`` is replaced too: py-amqp sets the socket's timeout for every
frame (and puts it back after), two ``fcntl`` calls and a context manager each time. A frame
already whole in the buffer needs no socket, so it is handed over without them.
"""

import errno
import socket
from struct import unpack_from
from typing import Any

from amqp.exceptions import UnexpectedFrame
from amqp.transport import TCPTransport
from kombu import Connection

RECV_BYTES = 65536
FRAME_END = 206
_RETRY = (errno.EAGAIN, errno.EINTR)
_UNAVAILABLE = {errno.EAGAIN, errno.EINTR, errno.ENOENT, errno.EWOULDBLOCK}  # as py-amqp: not a broken connection


class FrameReader:
    """Replaces a ``TCPTransport``'s ``read_frame`` (same contract: ``(type, channel, payload)``)."""

    def __init__(self, transport: TCPTransport):
        self.transport = transport
        self.buffer = bytearray(transport._read_buffer)  # what py-amqp had read ahead (the handshake's)
        self.position = 0

    def _fill(self, needed: int, initial: bool) -> None:
        """Read until ``needed`` bytes past ``position`` are buffered."""
        transport = self.transport
        while len(self.buffer) - self.position < needed:
            try:
                chunk = transport.sock.recv(RECV_BYTES)
            except socket.timeout:
                raise
            except OSError as exc:
                if exc.errno in _RETRY:
                    if initial and transport.raise_on_initial_eintr:
                        raise socket.timeout() from None
                    continue
                if exc.errno not in _UNAVAILABLE:
                    transport.connected = False
                raise
            if not chunk:
                transport.connected = False
                raise OSError("Server unexpectedly closed connection")
            if self.position:
                del self.buffer[:self.position]
                self.position = 0
            self.buffer += chunk

    def read_frame(self) -> tuple[int, int, bytes]:
        self._fill(7, initial=True)
        frame_type, channel, size = unpack_from(">BHI", self.buffer, self.position)
        self._fill(7 + size + 1, initial=False)
        return self._take(frame_type, channel, size)

    def buffered_frame(self) -> tuple[int, int, bytes] | None:
        """The next frame if it is whole in the buffer, else None (and nothing taken)."""
        available = len(self.buffer) - self.position
        if available < 7:
            return None
        frame_type, channel, size = unpack_from(">BHI", self.buffer, self.position)
        return self._take(frame_type, channel, size) if available >= 7 + size + 1 else None

    def _take(self, frame_type: int, channel: int, size: int) -> tuple[int, int, bytes]:
        start = self.position + 7
        payload = bytes(self.buffer[start:start + size])
        frame_end = self.buffer[start + size]
        self.position = start + size + 1
        if frame_end != FRAME_END:
            raise UnexpectedFrame(f"Received frame_end {frame_end:#04x} while expecting 0xce")
        return frame_type, channel, payload


def buffer_frame_reads(connection: Connection) -> None:
    """Give a connected kombu connection's RabbitMQ transport the buffered reader (plain TCP only:
    TLS and the in-memory transport keep their own)."""
    amqp_connection = connection.connection
    transport = getattr(amqp_connection, "transport", None)
    if type(transport) is not TCPTransport or isinstance(getattr(transport.read_frame, "__self__", None), FrameReader):
        return
    reader = FrameReader(transport)
    transport.read_frame = reader.read_frame

    def blocking_read(timeout: float | None = None) -> Any:
        """``amqp.Connection.blocking_read``, without the socket for a frame already buffered."""
        frame = reader.buffered_frame()
        if frame is None:
            with transport.having_timeout(timeout):
                frame = reader.read_frame()
        return amqp_connection.on_inbound_frame(frame)

    amqp_connection.blocking_read = blocking_read
