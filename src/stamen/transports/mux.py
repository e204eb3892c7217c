"""Many flow-controlled streams over one byte pipe (the tcp transport's connection).

The packet format is in `packets`. The opener marks its first packet on a stream with
SYN; dialers use odd stream ids and acceptors even ones. Every length and count is checked against `Limits` before anything
is allocated; any violation, or a packet the state machine does not expect, closes the
connection (the peer is broken or hostile; other connections are untouched).

Flow control is per stream and credit based: a sender may have at most the receiver's
`window_bytes` of payload unacknowledged. The receiver grants credit back at once while
no complete message waits in its queue (so a message larger than the window still flows),
and holds it while the application is not reading, so a stalled reader costs at most one
message plus one window, and never blocks the other streams. Keepalive pings close a
connection whose peer has been silent for `keepalive_timeout_s`.

This module knows nothing about sockets, addresses or handshakes: it is given a
connected `StreamReader`/`StreamWriter` pair and, optionally, the record ciphers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
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
from stamen.transports.handshake import RECORD_PREFIX, TAG_BYTES, RecordCipher
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
        self.streams: dict[int, MuxStream] = {}
        self._incoming: deque[MuxStream] = deque()
        self._unannounced: deque[MuxStream] = deque()
        self.changed = Signal()
        self._closed_error: ConnectionClosed | None = None
        self._inbox = bytearray()  # bytes of an incomplete packet
        self._max_payload_bytes = settings.max_packet_payload_bytes()
        self._write_resumed: asyncio.Future[None] | None = None
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._last_received_s = loop.time()
        self._tasks = [loop.create_task(self._keepalive_loop())]
        # Packets are parsed in the protocol callback itself: no reader task between the
        # socket and the stream that waits, so a message costs no extra loop iteration.
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
        outbound = sum(1 for stream_id in self.streams if stream_id % 2 == self._own_parity)
        if outbound >= self.remote_limits.max_streams:
            raise StreamClosed(f"the peer's stream limit ({self.remote_limits.max_streams})")
        stream_id = next(self._ids)
        self._next_local_id = stream_id + 2
        stream = MuxStream(self, stream_id, opened_locally=True)
        self.streams[stream_id] = stream
        # The peer learns of the stream from its first packet; when the caller sends at
        # once the SYN rides on that message, otherwise an empty packet carries it.
        self._unannounced.append(stream)
        asyncio.get_running_loop().call_soon(self.announce_streams, stream_id)
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
        self.raise_if_closed()
        payload_bytes = sum(len(part) for part in parts)
        header = PACKET.pack(kind, flags, 0, stream_id, payload_bytes)
        write = self._transport.write
        if self._send_cipher is not None:
            write(self._send_cipher.seal(b"".join((header, *parts))))
        elif payload_bytes < 64 * 1024:
            write(b"".join((header, *parts)))
        else:
            # Big chunks go as they are: one extra write beats copying the chunk.
            write(header)
            for part in parts:
                write(part)

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

    def feed(self, data: bytes | bytearray) -> None:
        """Parse every complete packet in what arrived; keep the incomplete rest."""
        if self.is_closed:
            return
        if self._inbox:
            self._inbox += data
            data = self._inbox
        try:
            consumed = self._parse(data)
        except ProtocolError as exc:
            logger.warning("dropping connection to %s: %s", self._remote_address, exc)
            self._transport.abort()
            self._shutdown(ConnectionClosed(f"protocol error: {exc}"))
            return
        except _GoAway:
            self._shutdown(ConnectionClosed("the peer closed the connection"))
            return
        if data is self._inbox:
            del self._inbox[:consumed]
        elif consumed < len(data):
            self._inbox = bytearray(data[consumed:])
        self._last_received_s = self._loop.time()

    def _parse(self, data: bytes | bytearray) -> int:
        """Dispatch the complete packets at the start of `data`; bytes consumed."""
        position, end = 0, len(data)
        copy = isinstance(data, bytearray)  # views of the inbox must not outlive this call
        view = memoryview(data)
        try:
            while not self.is_closed:
                if self._recv_cipher is not None:
                    if end - position < RECORD_PREFIX.size:
                        break
                    (sealed_bytes,) = RECORD_PREFIX.unpack_from(data, position)
                    if not PACKET.size + TAG_BYTES <= sealed_bytes:
                        raise ProtocolError(f"record of {sealed_bytes} bytes refused")
                    if sealed_bytes > PACKET.size + self._max_payload_bytes + TAG_BYTES:
                        raise ProtocolError(f"record of {sealed_bytes} bytes refused")
                    record_end = position + RECORD_PREFIX.size + sealed_bytes
                    if record_end > end:
                        break
                    try:
                        record = self._recv_cipher.open(
                            view[position : position + RECORD_PREFIX.size].tobytes(),
                            view[position + RECORD_PREFIX.size : record_end],
                        )
                    except InvalidTag as exc:
                        raise ProtocolError("a record failed authentication") from exc
                    packet = memoryview(record)
                    position = record_end
                else:
                    if end - position < PACKET.size:
                        break
                    payload_bytes = PACKET.unpack_from(data, position)[4]
                    if payload_bytes > self._max_payload_bytes:
                        raise ProtocolError(f"packet of {payload_bytes} bytes refused")
                    packet_end = position + PACKET.size + payload_bytes
                    if packet_end > end:
                        break
                    packet = view[position:packet_end]
                    if copy:
                        packet = memoryview(packet.tobytes())
                    position = packet_end
                self._on_packet(packet)
        finally:
            view.release()
        return position

    def _on_packet(self, packet: memoryview) -> None:
        kind, flags, reserved, stream_id, payload_bytes = PACKET.unpack_from(packet)
        if payload_bytes != len(packet) - PACKET.size:
            raise ProtocolError("packet length disagrees with its record")
        if reserved != 0 or flags & ~FLAG_SYN:
            raise ProtocolError("unknown packet flags")
        self._dispatch(kind, flags, stream_id, packet[PACKET.size :])

    def _dispatch(self, kind: int, flags: int, stream_id: int, payload: memoryview) -> None:
        if kind in STREAM_KINDS:
            stream = self._stream_for(kind, flags, stream_id)
            if stream is not None:
                stream.on_packet(kind, payload)
            return
        if stream_id != 0 or flags:
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

    def _stream_for(self, kind: int, flags: int, stream_id: int) -> MuxStream | None:
        """The stream a packet belongs to; None for one that is already forgotten."""
        stream = self.streams.get(stream_id)
        from_peer_side = stream_id % 2 != self._own_parity
        if flags & FLAG_SYN:
            if stream is not None or not from_peer_side or stream_id <= self._highest_remote_id:
                raise ProtocolError(f"bad stream open {stream_id}")
            self._highest_remote_id = stream_id
            inbound = sum(1 for known in self.streams if known % 2 != self._own_parity)
            if inbound >= self.settings.limits.max_streams:
                self.write_packet(Kind.RESET, 0, stream_id)
                return None
            stream = MuxStream(self, stream_id, opened_locally=False)
            self.streams[stream_id] = stream
            self._incoming.append(stream)
            self.changed.fire()
            return stream
        if stream is None:
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

    def forget(self, stream: MuxStream) -> None:
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]

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


class _PacketProtocol(asyncio.Protocol):
    """Feeds the socket's bytes to a `MuxConnection` and reports its fate."""

    def __init__(self, connection: MuxConnection) -> None:
        self._connection = connection

    def data_received(self, data: bytes) -> None:
        self._connection.feed(data)

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
