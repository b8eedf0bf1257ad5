"""Buffered reading of AMQP frames from RabbitMQ.

py-amqp reads each frame with two ``recv`` calls of exactly the bytes it needs (the 7-byte header,
then the payload and the frame-end octet), so a delivery (method, header and body frames) costs
six system calls, each through Python. Here a transport reads up to ``RECV_BYTES`` at a time into
a buffer and frames are cut out of it: for a stream of small messages, one system call serves
dozens of them. A frame is only taken once it is whole, so a timeout in the middle of one leaves
everything in the buffer for the next read, as py-amqp's own reader does.
"""

import errno
import socket
from struct import unpack_from

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
    transport = getattr(connection.connection, "transport", None)
    if type(transport) is TCPTransport and not isinstance(getattr(transport.read_frame, "__self__", None), FrameReader):
        transport.read_frame = FrameReader(transport).read_frame
