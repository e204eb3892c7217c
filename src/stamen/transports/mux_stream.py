"""One stream of a `MuxConnection`: message framing, credit-based flow control, close and
reset. See `mux` for the flow-control policy and `packets` for the wire format.

Messages are sent as one MSG packet (frame sizes, then data) and as many DATA packets as
needed; a stream's messages never interleave (a lock), while different streams' packets
do. Received frames are validated against our `Limits` before anything is kept.

Each end sends exactly one terminal packet on a stream the peer knows of: CLOSE (graceful)
or RESET (abort). An end that receives the peer's terminal first answers with its own as
soon as its application is done with the stream (right away for a RESET). A stream id
counts against `max_streams` on each side until that side has both sent and received a
terminal, so the opener never counts a slot free before the acceptor does.

This module knows nothing about records, sockets or keepalives: it calls
`MuxConnection.write_packet` / `write_message` / `drain` / `retire` and is fed packets
through `on_packet`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import struct
from collections import deque
from typing import TYPE_CHECKING

from stamen.transports.base import Frames, Stream, StreamClosed, TransportError
from stamen.transports.flow import Signal, check_message
from stamen.transports.packets import (
    CHUNK_BYTES,
    FLAG_SYN,
    FRAME_BYTES,
    FRAME_COUNT,
    WINDOW,
    Kind,
    ProtocolError,
    message_packet,
)

if TYPE_CHECKING:
    from stamen.transports.mux import MuxConnection

MAX_CREDIT_BYTES = 1 << 62  # more than any sane window; beyond it the peer is lying


@functools.cache
def frame_sizes(frame_count: int) -> struct.Struct:
    return struct.Struct(f"!{frame_count}Q")


class MuxStream(Stream):
    def __init__(self, connection: MuxConnection, stream_id: int, *, opened_locally: bool):
        self._connection = connection
        self._id = stream_id
        self._syn_pending = opened_locally  # the peer learns of the stream from our 1st packet
        self._send_credit = connection.remote_window_bytes
        self._send_lock = asyncio.Lock()
        self._window_bytes = connection.settings.window_bytes
        self._allowance = self._window_bytes  # what the peer may still send us
        self._owed = 0  # received while a complete message waited: granted once it is read
        self._pending_grant = 0
        self._messages: deque[list[bytes]] = deque()
        self._frame_sizes: tuple[int, ...] | None = None  # of the message being assembled
        self._frames: list[bytes] = []
        self._chunks: list[bytes | memoryview] = []
        self._chunk_bytes = 0
        self._remaining_bytes = 0
        self._local_closed = False  # we closed, reset, or read the peer's close
        self._remote_closed = False
        self._was_reset = False
        self._terminal_sent = False
        self._terminal_received = False
        self.changed = Signal()

    @property
    def stream_id(self) -> int:
        return self._id

    # --- sending -------------------------------------------------------------------------

    def _raise_if_cannot_send(self) -> None:
        if self._was_reset or self._local_closed or self._remote_closed:
            raise StreamClosed(f"stream {self._id} is closed")
        self._connection.raise_if_closed()

    def _take_flags(self) -> int:
        if self._syn_pending:
            self._connection.announce_streams(self._id - 1)  # older streams' SYNs go first
            self._syn_pending = False
            return FLAG_SYN
        return 0

    def announce(self) -> None:
        """Tell the peer about this stream if no packet has done so yet."""
        if self._syn_pending and not (self._was_reset or self._connection.is_closed):
            with contextlib.suppress(TransportError):
                self._connection.write_packet(
                    Kind.WINDOW, self._take_flags(), self._id, (WINDOW.pack(0),)
                )

    async def send(self, frames: Frames) -> None:
        self._raise_if_cannot_send()
        connection = self._connection
        views = check_message(frames, connection.remote_limits)
        sizes = [len(view) for view in views]
        payload_bytes = FRAME_COUNT.size + FRAME_BYTES.size * len(sizes) + sum(sizes)
        if (
            payload_bytes <= CHUNK_BYTES
            and payload_bytes <= self._send_credit
            and not self._send_lock.locked()
        ):
            # The common message: one packet whose headers are packed in one call, no lock
            # round, no chunking.
            self._send_credit -= payload_bytes
            head = message_packet(len(sizes)).pack(
                Kind.MSG, self._take_flags(), 0, self._id, payload_bytes, len(sizes), *sizes
            )
            connection.write_message(head, views, payload_bytes)
            if connection.write_paused:
                await connection.drain()
            return
        header = struct.pack(f"!I{len(sizes)}Q", len(sizes), *sizes)
        async with self._send_lock:
            await self._send_packets(header, deque(view for view in views if len(view)))

    async def _send_packets(
        self, header: bytes, data: deque[bytes | bytearray | memoryview]
    ) -> None:
        first = True
        while first or data:
            await self._wait_for_credit(len(header) if first else 1)
            room = min(CHUNK_BYTES, self._send_credit - (len(header) if first else 0))
            parts: list[bytes | bytearray | memoryview] = [header] if first else []
            while data and room > 0:
                view = data[0]
                if len(view) <= room:
                    parts.append(data.popleft())
                    room -= len(view)
                else:
                    view = memoryview(view)
                    parts.append(view[:room])
                    data[0] = view[room:]
                    room = 0
            self._send_credit -= sum(len(part) for part in parts)
            kind = Kind.MSG if first else Kind.DATA
            self._connection.write_packet(kind, self._take_flags(), self._id, tuple(parts))
            first = False
            await self._connection.drain()

    async def _wait_for_credit(self, needed_bytes: int) -> None:
        while self._send_credit < needed_bytes:
            self._raise_if_cannot_send()
            await self.changed.wait()
        self._raise_if_cannot_send()

    # --- receiving -----------------------------------------------------------------------

    async def recv(self) -> list[bytes]:
        while True:
            if self._was_reset or self._local_closed:
                raise StreamClosed(f"stream {self._id} is closed")
            if self._messages:
                message = self._messages.popleft()
                if not self._messages and self._owed:
                    owed, self._owed = self._owed, 0
                    with contextlib.suppress(TransportError):
                        self._grant(owed)
                return message
            if self._remote_closed:
                # Everything the peer sent was read: the stream is over for both ends.
                self._end(Kind.CLOSE)
                raise StreamClosed(f"stream {self._id} was closed by the peer")
            self._connection.raise_if_closed()
            await self.changed.wait()

    def _grant(self, granted_bytes: int) -> None:
        self._allowance += granted_bytes
        self._pending_grant += granted_bytes
        # Batched so that a stream of small messages does not cost one WINDOW packet each.
        if self._pending_grant >= self._window_bytes // 4:
            pending, self._pending_grant = self._pending_grant, 0
            self._connection.write_packet(Kind.WINDOW, 0, self._id, (WINDOW.pack(pending),))

    def _account(self, received_bytes: int) -> None:
        if received_bytes > self._allowance:
            raise ProtocolError(f"stream {self._id}: the peer sent beyond its window")
        self._allowance -= received_bytes
        if self._messages:
            self._owed += received_bytes  # the reader is behind: hold the credit
        else:
            self._grant(received_bytes)

    def on_packet(self, kind: int, payload: memoryview) -> None:
        """Called by the connection's reader for each packet of this stream. The payload
        is a view of a buffer that is reused after this call: what is kept is copied."""
        if kind == Kind.MSG:
            if self._remote_closed:
                raise ProtocolError(f"stream {self._id}: packet after close")
            self._on_message_start(payload)
        elif kind == Kind.WINDOW:
            if len(payload) != WINDOW.size:
                raise ProtocolError("malformed window update")
            self._send_credit += WINDOW.unpack(payload)[0]
            if self._send_credit > MAX_CREDIT_BYTES:
                raise ProtocolError("window overflow")
        elif kind == Kind.RESET:
            self._terminal_received = True
            self._was_reset = True
            self._end(Kind.RESET)  # answers with our RESET: both ends then forget the id
        elif self._remote_closed:
            raise ProtocolError(f"stream {self._id}: packet after close")
        elif kind == Kind.DATA:
            if self._frame_sizes is None:
                raise ProtocolError(f"stream {self._id}: data outside a message")
            self._account(len(payload))
            self._take_data(payload)
        elif kind == Kind.CLOSE:
            if self._frame_sizes is not None or len(payload):
                raise ProtocolError(f"stream {self._id}: close inside a message")
            self._remote_closed = True
            self._terminal_received = True
        self.changed.fire()

    def _on_message_start(self, payload: memoryview) -> None:
        if self._frame_sizes is not None:
            raise ProtocolError(f"stream {self._id}: message inside a message")
        self._account(len(payload))
        if len(payload) < FRAME_COUNT.size:
            raise ProtocolError("truncated message header")
        (frame_count,) = FRAME_COUNT.unpack_from(payload)
        header_bytes = FRAME_COUNT.size + FRAME_BYTES.size * frame_count
        if frame_count > self._connection.settings.limits.max_frames:
            raise ProtocolError(f"message header with {frame_count} frames refused")
        if header_bytes > len(payload):
            raise ProtocolError(f"message header with {frame_count} frames refused")
        sizes = frame_sizes(frame_count).unpack_from(payload, FRAME_COUNT.size)
        total_bytes = sum(sizes)
        if total_bytes > self._connection.settings.limits.max_message_bytes:
            raise ProtocolError(f"message of {total_bytes} bytes refused")
        if total_bytes == len(payload) - header_bytes:
            # The whole message is in this packet: cut the frames out directly.
            frames, offset = [], header_bytes
            for size in sizes:
                frames.append(payload[offset : offset + size].tobytes())
                offset += size
            self._messages.append(frames)
            return
        self._frame_sizes, self._frames, self._remaining_bytes = sizes, [], total_bytes
        self._take_data(payload[header_bytes:])

    def _take_data(self, data: memoryview) -> None:
        sizes = self._frame_sizes
        assert sizes is not None  # checked by the callers
        if len(data) > self._remaining_bytes:
            raise ProtocolError(f"stream {self._id}: more data than the message declared")
        self._remaining_bytes -= len(data)
        while len(self._frames) < len(sizes):
            wanted = sizes[len(self._frames)] - self._chunk_bytes
            if wanted == 0:
                chunks, self._chunks, self._chunk_bytes = self._chunks, [], 0
                if len(chunks) == 1:
                    only = chunks[0]
                    self._frames.append(only if type(only) is bytes else bytes(only))
                else:
                    self._frames.append(b"".join(chunks))
                continue
            if not data:
                return
            taken = min(wanted, len(data))
            chunk = data[:taken]
            # A view of the connection's buffer must not outlive this call: a chunk that
            # does not complete its frame here is copied.
            self._chunks.append(chunk if taken == wanted else chunk.tobytes())
            self._chunk_bytes += taken
            data = data[taken:]
        self._messages.append(self._frames)
        self._frame_sizes, self._frames = None, []

    def _drop_received(self) -> None:
        self._messages.clear()
        self._frame_sizes, self._frames, self._chunks, self._chunk_bytes = None, [], [], 0

    # --- closing -------------------------------------------------------------------------

    async def close(self) -> None:
        if self._local_closed or self._was_reset:
            return
        async with self._send_lock:  # a message being sent goes out whole first
            if self._local_closed or self._was_reset:
                return
            self._end(Kind.CLOSE)

    def reset(self) -> None:
        if self._local_closed or self._was_reset:
            return
        self._was_reset = True
        self._end(Kind.RESET)

    def _end(self, kind: int) -> None:
        """We are done with the stream: send our terminal packet (unless the peer never
        heard of the stream) and let the connection retire it."""
        self._local_closed = True
        if not self._terminal_sent:
            self._terminal_sent = True
            if self._syn_pending and kind == Kind.RESET:
                self._syn_pending = False  # never announced: nothing to tell, nothing to wait for
                self._terminal_received = True
            else:
                with contextlib.suppress(TransportError):
                    self._connection.write_packet(kind, self._take_flags(), self._id)
            self._connection.retire(self, peer_done=self._terminal_received)
        self._drop_received()
        self.changed.fire()
