"""Many flow-controlled streams over one byte pipe (the tcp transport's connection).

The packet format is in `packets`. The opener marks its first packet on a stream with
SYN; dialers use odd stream ids and acceptors even ones. Every length and count is
checked against `Limits` before anything is allocated; any violation, or a packet the
state machine does not expect, closes the connection (the peer is broken or hostile;
other connections are untouched). Closing is acknowledged (see `mux_stream`): a stream
holds one of `max_streams` slots on each side until both ends sent their terminal packet.

Flow control is per stream and credit based: a sender may have at most the receiver's
`window_bytes` of payload unacknowledged. The receiver grants credit back at once while
no complete message waits in its queue (so a message larger than the window still flows),
and holds it while the application is not reading, so a stalled reader costs at most one
message plus one window, and never blocks the other streams. Keepalive pings close a
connection whose peer has been silent for `keepalive_timeout_s`.

On the hot path, bytes are received into one growing buffer (`BufferedProtocol`: no
bytes object per read), records are decrypted into one reused buffer, packets are parsed
in the protocol callback (no reader task), and the only copy is the frames handed out.
The price is memory: a connection that has carried big messages keeps about 1 MiB of
buffers (receive, plaintext, and the cipher's send buffers).

This module knows nothing about sockets, addresses or handshakes: it is given a
connected asyncio transport and, optionally, the record ciphers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag

from stamen.transports.base import (
    Connection,
    ConnectionClosed,
    Limits,
    StreamClosed,
    TransportError,
)
from stamen.transports.flow import Signal
from stamen.transports.handshake import (
    BIG_RECORD_BYTES,
    RECORD_PREFIX,
    TAG_BYTES,
    RecordCipher,
)
from stamen.transports.mux_stream import MuxStream
from stamen.transports.packets import (
    CHUNK_BYTES,
    FLAG_SYN,
    PACKET,
    PING_BYTES,
    STREAM_KINDS,
    Kind,
    ProtocolError,
    message_header_bytes,
)

logger = logging.getLogger(__name__)

INITIAL_INBOX_BYTES = 64 * 1024
MIN_READ_BYTES = 32 * 1024  # free room offered to each socket read


@dataclass(frozen=True)
class MuxSettings:
    """Local knobs of one connection."""

    limits: Limits
    window_bytes: int
    keepalive_interval_s: float
    keepalive_timeout_s: float

    def max_packet_payload_bytes(self) -> int:
        return CHUNK_BYTES + message_header_bytes(self.limits.max_frames)


class MuxConnection(Connection):
    """One tcp connection: the packet reader, the keepalive and the streams."""

    def __init__(
        self,
        transport: asyncio.Transport,
        *,
        settings: MuxSettings,
        remote_public_key: bytes,
        remote_address: str,
        remote_limits: Limits,
        remote_window_bytes: int,
        is_dialer: bool,
        send_cipher: RecordCipher | None = None,
        recv_cipher: RecordCipher | None = None,
        keep_alive: tuple[object, ...] = (),
    ) -> None:
        self._transport = transport
        # e.g. the StreamWriter of the handshake, which closes the socket when collected
        self._keep_alive = keep_alive
        self.settings = settings
        self._remote_public_key = remote_public_key
        self._remote_address = remote_address
        self.remote_limits = remote_limits
        self.remote_window_bytes = remote_window_bytes
        self._send_cipher = send_cipher
        self._recv_cipher = recv_cipher
        self._own_parity = 1 if is_dialer else 0
        self._ids = itertools.count(1 if is_dialer else 2, 2)
        self._next_local_id = 1 if is_dialer else 2
        self._highest_remote_id = 0
        self.streams: dict[int, MuxStream] = {}  # live: neither end sent its terminal yet
        # Streams we sent our terminal on, waiting for the peer's: they still hold a slot.
        self._closing: set[int] = set()
        self._outbound_count = 0  # our streams holding a slot (live or closing)
        self._inbound_count = 0
        self._incoming: deque[MuxStream] = deque()
        self._unannounced: deque[MuxStream] = deque()
        self.changed = Signal()
        self._closed_error: ConnectionClosed | None = None
        self._max_payload_bytes = settings.max_packet_payload_bytes()
        self._max_sealed_bytes = PACKET.size + self._max_payload_bytes + TAG_BYTES
        self._inbox = _Inbox(RECORD_PREFIX.size + self._max_sealed_bytes)
        # Records are decrypted into one buffer (grown on demand); streams copy out what
        # they keep.
        self._plaintext = memoryview(bytearray())
        self._write_resumed: asyncio.Future[None] | None = None
        self._spare: bytearray | None = None  # see write_message
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._last_received_s = loop.time()
        self._tasks = [loop.create_task(self._keepalive_loop())]
        # Packets are parsed in the protocol callback itself: no reader task between the
        # socket and the stream that waits, so a message costs no extra loop iteration.
        # Bytes are received straight into `_inbox` (recv_into), and records are decrypted
        # from there: no bytes object per read, no concatenation of partial packets.
        transport.set_protocol(_PacketProtocol(self))

    # --- Connection API ------------------------------------------------------------------

    @property
    def remote_public_key(self) -> bytes:
        return self._remote_public_key

    @property
    def remote_address(self) -> str:
        return self._remote_address

    @property
    def is_closed(self) -> bool:
        return self._closed_error is not None

    def raise_if_closed(self) -> None:
        if self._closed_error is not None:
            raise ConnectionClosed(str(self._closed_error))

    async def open_stream(self) -> MuxStream:
        self.raise_if_closed()
        if self._outbound_count >= self.remote_limits.max_streams:
            raise StreamClosed(f"the peer's stream limit ({self.remote_limits.max_streams})")
        stream_id = next(self._ids)
        self._next_local_id = stream_id + 2
        stream = MuxStream(self, stream_id, opened_locally=True)
        self.streams[stream_id] = stream
        self._outbound_count += 1
        # The peer learns of the stream from its first packet; when the caller sends at
        # once the SYN rides on that message, otherwise an empty packet carries it.
        self._unannounced.append(stream)
        self._loop.call_soon(self.announce_streams, stream_id)
        return stream

    def announce_streams(self, up_to_id: int) -> None:
        """Send the SYN of every stream opened before `up_to_id` still unknown to the
        peer, so that the peer sees stream ids in increasing order."""
        while self._unannounced and self._unannounced[0].stream_id < up_to_id + 1:
            self._unannounced.popleft().announce()

    async def accept_stream(self) -> MuxStream:
        while True:
            if self._incoming:
                return self._incoming.popleft()
            self.raise_if_closed()
            await self.changed.wait()

    async def close(self) -> None:
        if self.is_closed:
            return
        with contextlib.suppress(TransportError):
            self.write_packet(Kind.GOAWAY, 0, 0)
        self._shutdown(ConnectionClosed("connection closed locally"))

    def abort(self) -> None:
        """Drop the socket at once, without a goodbye (the peer sees a reset)."""
        self._transport.abort()
        self._shutdown(ConnectionClosed("connection aborted locally"))

    def stop_responding(self) -> None:
        """Testing aid: keep the socket open but stop reading and sending keepalives, as a
        hung peer would."""
        for task in self._tasks:
            task.cancel()
        self._transport.pause_reading()

    # --- writing -------------------------------------------------------------------------

    def write_packet(
        self,
        kind: int,
        flags: int,
        stream_id: int,
        parts: tuple[bytes | bytearray | memoryview, ...] = (),
    ) -> None:
        """Queue one packet on the socket; never waits (see `drain`)."""
        payload_bytes = sum(len(part) for part in parts)
        header = PACKET.pack(kind, flags, 0, stream_id, payload_bytes)
        self.write_message(header, parts, payload_bytes)

    def write_message(
        self, head: bytes, parts: Sequence[bytes | bytearray | memoryview], payload_bytes: int
    ) -> None:
        """Queue one packet: `head` starts with its PACKET header, `parts` follow."""
        if self._closed_error is not None:
            raise ConnectionClosed(str(self._closed_error))
        write = self._transport.write
        packet_bytes = PACKET.size + payload_bytes
        if self._send_cipher is not None:
            if packet_bytes < BIG_RECORD_BYTES:
                write(self._send_cipher.seal_parts((head, *parts), packet_bytes))
                return
            # Big records reuse one buffer: a fresh 256 KiB allocation costs more than its
            # encryption. Reusable only if the socket took the whole record at once, since
            # asyncio may keep a reference to what it queues.
            record = self._send_cipher.seal_parts((head, *parts), packet_bytes, self._spare)
            spare = record.obj if isinstance(record, memoryview) else None
            self._spare = spare if isinstance(spare, bytearray) else None
            write(record)
            if self._transport.get_write_buffer_size():
                self._spare = None
        elif packet_bytes < 64 * 1024:
            write(b"".join((head, *parts)))
        else:
            # Big chunks go as they are: one extra write beats copying the chunk.
            write(head)
            for part in parts:
                write(part)

    @property
    def write_paused(self) -> bool:
        return self._write_resumed is not None

    async def drain(self) -> None:
        """Wait while the socket's send buffer is full."""
        if self._write_resumed is not None:
            await asyncio.shield(self._write_resumed)
        self.raise_if_closed()

    def pause_writing(self) -> None:
        if self._write_resumed is None:
            self._write_resumed = self._loop.create_future()

    def resume_writing(self) -> None:
        waiter, self._write_resumed = self._write_resumed, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- reading -------------------------------------------------------------------------

    def receive_buffer(self) -> memoryview:
        """Where the socket's next bytes go (see `received`)."""
        return self._inbox.space()

    def feed(self, data: bytes | bytearray) -> None:
        """Take bytes that arrived outside the protocol (buffered by the handshake)."""
        view = memoryview(data)
        while view and not self.is_closed:
            space = self._inbox.space()
            taken = min(len(space), len(view))
            space[:taken] = view[:taken]
            self.received(taken)
            view = view[taken:]

    def received(self, nbytes: int) -> None:
        """`nbytes` more bytes sit in the receive buffer: dispatch every complete packet."""
        self._inbox.end += nbytes
        if self._closed_error is not None:
            return
        self._last_received_s = self._loop.time()
        try:
            self._parse(self._inbox)
        except ProtocolError as exc:
            logger.warning("dropping connection to %s: %s", self._remote_address, exc)
            self._transport.abort()
            self._shutdown(ConnectionClosed(f"protocol error: {exc}"))
        except _GoAway:
            self._shutdown(ConnectionClosed("the peer closed the connection"))

    def _parse(self, inbox: _Inbox) -> None:
        """Dispatch the complete packets (records) in the inbox; keep the incomplete rest."""
        buffer, position, end = inbox.buffer, inbox.start, inbox.end
        view = memoryview(buffer)
        cipher = self._recv_cipher
        inbox.wanted_bytes = 0
        try:
            while self._closed_error is None:
                if cipher is not None:
                    if end - position < RECORD_PREFIX.size:
                        break
                    (sealed_bytes,) = RECORD_PREFIX.unpack_from(buffer, position)
                    if not PACKET.size + TAG_BYTES <= sealed_bytes <= self._max_sealed_bytes:
                        raise ProtocolError(f"record of {sealed_bytes} bytes refused")
                    record_end = position + RECORD_PREFIX.size + sealed_bytes
                    if record_end > end:
                        inbox.wanted_bytes = record_end - position
                        break
                    self._open_record(cipher, view, position, record_end)
                else:
                    if end - position < PACKET.size:
                        break
                    payload_bytes = PACKET.unpack_from(buffer, position)[4]
                    if payload_bytes > self._max_payload_bytes:
                        raise ProtocolError(f"packet of {payload_bytes} bytes refused")
                    record_end = position + PACKET.size + payload_bytes
                    if record_end > end:
                        inbox.wanted_bytes = record_end - position
                        break
                    self._on_packet(view[position:record_end])
                position = record_end
        finally:
            inbox.start = position

    def _open_record(self, cipher: RecordCipher, view: memoryview, start: int, end: int) -> None:
        plaintext_bytes = end - start - RECORD_PREFIX.size - TAG_BYTES
        if len(self._plaintext) < plaintext_bytes:
            self._plaintext = memoryview(bytearray(max(plaintext_bytes, MIN_READ_BYTES)))
        packet = self._plaintext[:plaintext_bytes]
        try:
            cipher.open_into(
                view[start : start + RECORD_PREFIX.size],
                view[start + RECORD_PREFIX.size : end],
                packet,
            )
        except InvalidTag as exc:
            raise ProtocolError("a record failed authentication") from exc
        self._on_packet(packet)

    def _on_packet(self, packet: memoryview) -> None:
        kind, flags, reserved, stream_id, payload_bytes = PACKET.unpack_from(packet)
        if payload_bytes != len(packet) - PACKET.size:
            raise ProtocolError("packet length disagrees with its record")
        if not (flags or reserved) and kind in STREAM_KINDS:
            stream = self.streams.get(stream_id)
            if stream is not None:  # the common case: a packet of a live stream
                stream.on_packet(kind, packet[PACKET.size :])
                return
        self._on_packet_fields(kind, flags, reserved, stream_id, packet[PACKET.size :])

    def _on_packet_fields(
        self,
        kind: int,
        flags: int,
        reserved: int,
        stream_id: int,
        payload: memoryview,
    ) -> None:
        if kind in STREAM_KINDS:
            stream = self._stream_for_packet(kind, flags, reserved, stream_id)
            if stream is not None:
                stream.on_packet(kind, payload)
            return
        if reserved != 0 or flags:
            raise ProtocolError("unknown packet flags")
        if stream_id != 0:
            raise ProtocolError("connection packet on a stream")
        if kind == Kind.PING:
            if len(payload) != PING_BYTES:
                raise ProtocolError("malformed ping")
            self.write_packet(Kind.PONG, 0, 0, (payload,))
        elif kind == Kind.PONG:
            pass  # receiving it already refreshed the keepalive clock
        elif kind == Kind.GOAWAY:
            raise _GoAway
        else:
            raise ProtocolError(f"unknown packet type {kind}")

    def _stream_for_packet(
        self, kind: int, flags: int, reserved: int, stream_id: int
    ) -> MuxStream | None:
        """The stream a packet belongs to; None for one that is already forgotten."""
        if reserved != 0 or flags & ~FLAG_SYN:
            raise ProtocolError("unknown packet flags")
        stream = self.streams.get(stream_id)
        if stream is not None and not flags:
            return stream
        from_peer_side = stream_id % 2 != self._own_parity
        if flags & FLAG_SYN:
            if stream is not None or not from_peer_side or stream_id <= self._highest_remote_id:
                raise ProtocolError(f"bad stream open {stream_id}")
            self._highest_remote_id = stream_id
            if self._inbound_count >= self.settings.limits.max_streams:
                self.write_packet(Kind.RESET, 0, stream_id)
                return None
            stream = MuxStream(self, stream_id, opened_locally=False)
            self.streams[stream_id] = stream
            self._inbound_count += 1
            self._incoming.append(stream)
            self.changed.fire()
            return stream
        if stream is None:
            if stream_id in self._closing:
                if kind == Kind.CLOSE or kind == Kind.RESET:  # the peer's terminal: slot free
                    self._closing.discard(stream_id)
                    self._release(stream_id)
                return None
            known_past = (
                stream_id < self._next_local_id
                if not from_peer_side
                else 0 < stream_id <= self._highest_remote_id
            )
            if not known_past:
                raise ProtocolError(f"packet for unknown stream {stream_id}")
        return stream

    async def _keepalive_loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval_s = self.settings.keepalive_interval_s
        while True:
            await asyncio.sleep(interval_s)
            silent_s = loop.time() - self._last_received_s
            if silent_s > self.settings.keepalive_timeout_s:
                logger.info("peer %s silent for %.1f s", self._remote_address, silent_s)
                self._shutdown(ConnectionClosed(f"the peer was silent for {silent_s:.1f} s"))
                return
            if silent_s >= interval_s:
                with contextlib.suppress(TransportError):
                    self.write_packet(Kind.PING, 0, 0, (bytes(PING_BYTES),))

    # --- teardown ------------------------------------------------------------------------

    def lost(self, reason: ConnectionClosed) -> None:
        self._shutdown(reason)

    def retire(self, stream: MuxStream, *, peer_done: bool) -> None:
        """`stream` sent its terminal packet: stop routing packets to it. Its slot stays
        taken until the peer's terminal has arrived too (`peer_done`, or later)."""
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
        if peer_done:
            self._release(stream.stream_id)
        else:
            self._closing.add(stream.stream_id)

    def _release(self, stream_id: int) -> None:
        if stream_id % 2 == self._own_parity:
            self._outbound_count -= 1
        else:
            self._inbound_count -= 1

    def _shutdown(self, reason: ConnectionClosed) -> None:
        if self._closed_error is not None:
            return
        self._closed_error = reason
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        self._transport.close()
        self.resume_writing()
        self.changed.fire()
        for stream in list(self.streams.values()):
            stream.changed.fire()


class _GoAway(Exception):
    """The peer announced it is closing the connection."""


class _Inbox:
    """The receive buffer: bytes [start, end) arrived but are not parsed yet. It grows to
    fit the record being received (`wanted_bytes`, known from its header), up to the
    largest record the peer may send."""

    def __init__(self, max_record_bytes: int) -> None:
        self.buffer = bytearray(INITIAL_INBOX_BYTES)
        self.start = 0
        self.end = 0
        self.wanted_bytes = 0
        self._max_capacity_bytes = 2 * (max_record_bytes + MIN_READ_BYTES)

    def space(self) -> memoryview:
        if self.start == self.end:
            self.start = self.end = 0
        capacity = len(self.buffer)
        if capacity - self.start < self.wanted_bytes or capacity - self.end < MIN_READ_BYTES:
            self._make_room()
        return memoryview(self.buffer)[self.end :]

    def _make_room(self) -> None:
        pending = self.end - self.start
        capacity = len(self.buffer)
        while capacity < max(self.wanted_bytes, pending + MIN_READ_BYTES):
            capacity *= 2
        if capacity > self._max_capacity_bytes:
            raise ProtocolError("receive buffer limit exceeded")  # the parser refuses first
        if capacity == len(self.buffer):
            # Same length: allowed even while asyncio still holds a view of the buffer.
            self.buffer[:pending] = self.buffer[self.start : self.end]
        else:
            grown = bytearray(capacity)
            grown[:pending] = self.buffer[self.start : self.end]
            self.buffer = grown
        self.start, self.end = 0, pending


class _PacketProtocol(asyncio.BufferedProtocol):
    """Receives the socket's bytes into a `MuxConnection` and reports its fate."""

    def __init__(self, connection: MuxConnection) -> None:
        self._connection = connection

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._connection.receive_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._connection.received(nbytes)

    def eof_received(self) -> bool:
        self._connection.lost(ConnectionClosed("the peer closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"connection lost: {exc}" if exc else "the peer closed the connection"
        self._connection.lost(ConnectionClosed(reason))

    def pause_writing(self) -> None:
        self._connection.pause_writing()

    def resume_writing(self) -> None:
        self._connection.resume_writing()
