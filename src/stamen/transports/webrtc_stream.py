"""One stream of the WebRTC mux: the frame format, cutting messages into data-channel
chunks and reassembling them within `Limits`, and the stream's credit flow control.

Every data-channel message is one frame: a 5-byte header `(kind u8, stream_id u32)` and a
payload. A message travels as one `MSG` frame (frame count, frame lengths, start of the
body) followed by `CONT` frames, each at most `chunk_bytes` long, header included.

Credit: the receiver returns credit for bytes it has taken in while its inbox is empty, and
withholds it while unread messages wait, so a slow reader holds at most one message plus
`window_bytes`. Returned credit is batched (a quarter window) so that small messages do not
cost a `CREDIT` frame each.

A stream ends for both sides, and its id is forgotten, once each side has closed it (sent
`FIN`, which a reader that drains the peer's `FIN` does by itself) or either reset it. The
connection (`webrtc_mux`) routes frames here and owns the channel; this module knows
nothing about aiortc, handshakes or liveness.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Iterator
from enum import IntEnum
from typing import TYPE_CHECKING

from stamen.transports.base import (
    ConnectionClosed,
    Frames,
    HandshakeError,
    MessageTooLarge,
    Stream,
    StreamClosed,
    TransportError,
)
from stamen.transports.flow import Signal, check_message

if TYPE_CHECKING:
    from stamen.transports.webrtc_mux import MuxConnection

logger = logging.getLogger(__name__)


class Kind(IntEnum):
    HELLO = 1
    PING = 2
    PONG = 3
    OPEN = 4
    MSG = 5  # first chunk of a message: frame count, frame lengths, start of the body
    CONT = 6  # a further chunk of the body
    FIN = 7
    RESET = 8
    CREDIT = 9
    GOAWAY = 10
    REFUSE = 11


HEADER = struct.Struct("!BI")  # (kind, stream_id)
CREDIT = struct.Struct("!Q")
_COUNT = struct.Struct("!I")


def wire_chunks(
    stream_id: int, head: bytes, views: list[memoryview], chunk_bytes: int
) -> Iterator[bytes]:
    """Yield whole data-channel messages (header + payload) of at most `chunk_bytes`."""
    room = chunk_bytes - HEADER.size
    parts: list[bytes | memoryview] = [HEADER.pack(Kind.MSG, stream_id), head]
    used = len(head)
    for view in views:
        offset = 0
        while offset < len(view):
            take = min(room - used, len(view) - offset)
            parts.append(view[offset : offset + take])
            used += take
            offset += take
            if used == room:
                yield b"".join(parts)
                parts, used = [HEADER.pack(Kind.CONT, stream_id)], 0
    if used or len(parts) > 1 or parts[0][0] == Kind.MSG:
        yield b"".join(parts)


def _split(data: bytes, lengths: tuple[int, ...]) -> list[bytes]:
    if len(lengths) == 1:
        return [data]
    frames, offset = [], 0
    for length in lengths:
        frames.append(data[offset : offset + length])
        offset += length
    return frames


class MuxStream(Stream):
    """One logical stream of a `MuxConnection`."""

    def __init__(self, connection: MuxConnection, stream_id: int, send_credit: int) -> None:
        self._connection = connection
        self._id = stream_id
        self._inbox: deque[list[bytes]] = deque()
        self.changed = Signal()
        self._send_lock = asyncio.Lock()
        self.send_credit = send_credit
        self.local_closed = False  # we closed or reset: no more sends or receives
        self.remote_closed = False  # the peer closed: drain the inbox, then StreamClosed
        self.was_reset = False
        self._error: TransportError | None = None
        # Reassembly of the message being received.
        self._lengths: tuple[int, ...] | None = None
        self._parts: list[memoryview] = []
        self._missing_bytes = 0
        # Credit taken in but not yet returned: batched, or held while messages wait unread.
        self._ungranted_bytes = 0
        self._withheld_bytes = 0

    @property
    def stream_id(self) -> int:
        return self._id

    @property
    def is_done(self) -> bool:
        """Both directions are over; the stream no longer counts against `max_streams`."""
        return self.was_reset or (self.local_closed and self.remote_closed)

    def _check_sendable(self) -> None:
        if self.was_reset or self.local_closed:
            raise StreamClosed(f"stream {self._id} is closed")
        if self.remote_closed:
            raise StreamClosed(f"stream {self._id} was closed by the peer")
        if self._connection.is_closed:
            raise ConnectionClosed(self._connection.close_reason)

    async def send(self, frames: Frames) -> None:
        connection = self._connection
        views = [memoryview(view) for view in check_message(frames, connection.peer_limits)]
        lengths = [len(view) for view in views]
        head = _COUNT.pack(len(views)) + struct.pack(f"!{len(views)}Q", *lengths)
        if len(head) + HEADER.size >= connection.settings.chunk_bytes:
            raise MessageTooLarge(f"{len(views)} frames do not fit one chunk's header")
        self._check_sendable()
        async with self._send_lock:
            for wire in wire_chunks(self._id, head, views, connection.settings.chunk_bytes):
                payload_bytes = len(wire) - HEADER.size
                while self.send_credit < payload_bytes:
                    self._check_sendable()
                    await self.changed.wait()
                await connection.wait_writable()
                self._check_sendable()
                self.send_credit -= payload_bytes
                connection.send_wire(wire)

    async def recv(self) -> list[bytes]:
        while True:
            if self._error is not None:
                raise self._error
            if self.was_reset or self.local_closed:
                raise StreamClosed(f"stream {self._id} is closed")
            if self._inbox:
                frames = self._inbox.popleft()
                if not self._inbox:
                    self._grant(self._withheld_bytes)
                    self._withheld_bytes = 0
                return frames
            if self.remote_closed:
                # Everything the peer sent was read: the stream is over for both ends, so
                # a reader that never calls `close` does not keep its slot forever.
                self._end_gracefully()
                raise StreamClosed(f"stream {self._id} was closed by the peer")
            if self._connection.is_closed:
                raise ConnectionClosed(self._connection.close_reason)
            await self.changed.wait()

    async def close(self) -> None:
        self._end_gracefully()

    def _end_gracefully(self) -> None:
        if self.local_closed or self.was_reset:
            return
        self._finish()
        self._connection.send_control(Kind.FIN, self._id)
        self._connection.forget_if_done(self)

    def reset(self) -> None:
        if self.was_reset:
            return
        self.was_reset = True
        self._finish()
        self._connection.send_control(Kind.RESET, self._id)
        self._connection.forget_if_done(self)

    def _finish(self) -> None:
        self.local_closed = True
        self._inbox.clear()
        self._parts = []
        self.changed.fire()

    # --- called by the connection for frames addressed to this stream ---

    def on_message_start(self, payload: memoryview) -> None:
        limits = self._connection.settings.limits
        if self._lengths is not None or len(payload) < _COUNT.size:
            raise HandshakeError("malformed message start")
        (count,) = _COUNT.unpack_from(payload)
        if count > limits.max_frames:
            return self._refuse(MessageTooLarge(f"peer sent {count} frames"))
        head_bytes = _COUNT.size + 8 * count
        if len(payload) < head_bytes:
            raise HandshakeError("message head cut short")
        lengths = struct.unpack_from(f"!{count}Q", payload, _COUNT.size)
        if sum(lengths) > limits.max_message_bytes:
            return self._refuse(MessageTooLarge(f"peer sent a {sum(lengths)}-byte message"))
        self._lengths, self._missing_bytes, self._parts = lengths, sum(lengths), []
        self.on_body(payload[head_bytes:], len(payload))

    def on_body(self, body: memoryview, payload_bytes: int) -> None:
        if self._lengths is None or len(body) > self._missing_bytes:
            raise HandshakeError("message body does not match its head")
        # Credit flows back while the reader keeps up; otherwise it waits for `recv`.
        if self._inbox:
            self._withheld_bytes += payload_bytes
        else:
            self._grant(payload_bytes)
        if body:
            self._parts.append(body)
            self._missing_bytes -= len(body)
        if self._missing_bytes == 0:
            self._inbox.append(_split(b"".join(self._parts), self._lengths))
            self._lengths, self._parts = None, []
            self.changed.fire()

    def on_credit(self, credit_bytes: int) -> None:
        self.send_credit += credit_bytes
        self.changed.fire()

    def on_fin(self) -> None:
        self.remote_closed = True
        self._lengths, self._parts = None, []
        self.changed.fire()

    def on_reset(self) -> None:
        self.was_reset = True
        self._finish()

    def _grant(self, payload_bytes: int) -> None:
        self._ungranted_bytes += payload_bytes
        # Batched so that small messages do not cost a credit frame each.
        if self._ungranted_bytes >= self._connection.settings.window_bytes // 4:
            self._connection.send_control(Kind.CREDIT, self._id, CREDIT.pack(self._ungranted_bytes))
            self._ungranted_bytes = 0

    def _refuse(self, error: TransportError) -> None:
        logger.warning("stream %d: %s; resetting it", self._id, error)
        self._error = error
        self.reset()
