"""Streams multiplexed over one aiortc data channel: the `Connection` of the WebRTC
transport, from the `Hello` exchange to the last `GOAWAY`.

1. One ordered, reliable data channel carries every frame (format in `webrtc_stream`).
   Dialers open odd stream ids, acceptors even ones, so both sides open without a race;
   each side caps the streams the other may hold open at its `max_streams`.
2. Backpressure, channel-wide: `send` waits while the data channel's `bufferedAmount` is
   above `high_water_bytes`, woken by `bufferedamountlow` at `low_water_bytes`, so nothing
   queues without bound inside aiortc either. Control frames bypass it: they are small and
   unblock the peer. Per-stream credit lives in `webrtc_stream`.
3. Handshake: `Hello`s are exchanged first and checked by the `verify` callback the
   transport passes in (see `webrtc_auth`); nothing else is accepted before.
4. Liveness: a PING every `keepalive_s`; nothing heard for `dead_after_s`, a closed channel
   or a failed ICE connection closes the connection (`ConnectionClosed` for every waiter).

This module knows nothing about signalling, SDP or ICE configuration; it is handed an
`RTCPeerConnection` and its channel, and owns both from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections import deque
from collections.abc import Callable, Coroutine

import msgspec
from aiortc import RTCDataChannel, RTCPeerConnection

from stamen.transports.base import (
    Connection,
    ConnectionClosed,
    HandshakeError,
    IdentityMismatch,
    Limits,
    StreamClosed,
)
from stamen.transports.flow import Signal
from stamen.transports.webrtc_auth import Hello
from stamen.transports.webrtc_config import SCHEME, MuxSettings
from stamen.transports.webrtc_stream import CREDIT, HEADER, Kind, MuxStream

logger = logging.getLogger(__name__)


class MuxConnection(Connection):
    """Streams over one data channel of one `RTCPeerConnection`; owns both."""

    def __init__(
        self,
        pc: RTCPeerConnection,
        channel: RTCDataChannel,
        *,
        is_dialer: bool,
        settings: MuxSettings,
        remote_address: str,
    ) -> None:
        self._pc = pc
        self._channel = channel
        self.settings = settings
        self._is_dialer = is_dialer
        self._remote_address = remote_address
        self._streams: dict[int, MuxStream] = {}
        self._incoming: deque[MuxStream] = deque()
        self._incoming_changed = Signal()
        self._writable = Signal()
        self._next_id = 1 if is_dialer else 2
        self._last_remote_id = 0
        self._closed = False
        self.close_reason = "connection closed"
        self._gone = asyncio.Event()
        self._peer_hello: asyncio.Future[Hello] = asyncio.get_running_loop().create_future()
        self._verify: Callable[[Hello], None] | None = None
        self._last_heard_s = time.monotonic()
        self._tasks: set[asyncio.Task[None]] = set()
        self._on_closed: list[Callable[[MuxConnection], None]] = []
        channel.bufferedAmountLowThreshold = settings.low_water_bytes
        channel.on("message", self._on_message)
        channel.on("bufferedamountlow", self._writable.fire)
        channel.on("close", lambda: self._die("the data channel closed"))
        pc.on("connectionstatechange", self._on_state)

    # --- Connection API ---

    @property
    def remote_public_key(self) -> bytes:
        return self._hello().public_key

    @property
    def remote_address(self) -> str:
        # An accepted peer may be unreachable except through us: name it by its key.
        if not self._remote_address and self._peer_hello.done():
            return f"{SCHEME}://incoming/{self.remote_public_key.hex()}"
        return self._remote_address or f"{SCHEME}://incoming"

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def peer_limits(self) -> Limits:
        hello = self._hello()
        return Limits(hello.max_frames, hello.max_message_bytes, hello.max_streams)

    async def open_stream(self) -> MuxStream:
        if self._closed:
            raise ConnectionClosed(self.close_reason)
        own = self._next_id % 2
        if sum(1 for i in self._streams if i % 2 == own) >= self._hello().max_streams:
            raise StreamClosed("the peer's stream limit is reached")
        stream_id, self._next_id = self._next_id, self._next_id + 2
        stream = MuxStream(self, stream_id, self._hello().window_bytes)
        self._streams[stream_id] = stream
        self.send_control(Kind.OPEN, stream_id)
        return stream

    async def accept_stream(self) -> MuxStream:
        while True:
            if self._incoming:
                return self._incoming.popleft()
            if self._closed:
                raise ConnectionClosed(self.close_reason)
            await self._incoming_changed.wait()

    async def close(self) -> None:
        if not self._closed:
            self.send_control(Kind.GOAWAY, 0)
            self._die("closed locally")
            # Let what is queued reach the peer; it closes its side when GOAWAY arrives.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._gone.wait(), self.settings.close_linger_s)
        await quiet_close(self._pc)
        for task in list(self._tasks):
            task.cancel()

    def on_closed(self, callback: Callable[[MuxConnection], None]) -> None:
        self._on_closed.append(callback)

    # --- handshake and liveness ---

    async def handshake(self, hello: Hello, verify: Callable[[Hello], None]) -> None:
        """Exchange and check `Hello`s, then start keepalives. Caller bounds the time."""
        self._verify = verify
        if self._channel.readyState != "open":
            opened = asyncio.get_running_loop().create_future()
            self._channel.on("open", lambda: None if opened.done() else opened.set_result(None))
            await asyncio.wait([opened, self._peer_hello], return_when=asyncio.FIRST_COMPLETED)
        if not self._peer_hello.done() or self._peer_hello.exception() is None:
            self.send_control(Kind.HELLO, 0, msgspec.msgpack.encode(hello))
        await self._peer_hello
        self._spawn(self._keepalive())

    def _hello(self) -> Hello:
        if not self._peer_hello.done() or self._peer_hello.exception() is not None:
            raise ConnectionClosed("the handshake has not completed")
        return self._peer_hello.result()

    async def _keepalive(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.settings.keepalive_s)
            if time.monotonic() - self._last_heard_s > self.settings.dead_after_s:
                self._die("the peer stopped answering")
                await quiet_close(self._pc)
                return
            self.send_control(Kind.PING, 0)

    def _on_state(self) -> None:
        if self._pc.connectionState in ("failed", "closed"):
            self._die(f"the WebRTC connection {self._pc.connectionState}")

    def _die(self, reason: str) -> None:
        if self._closed:
            self._gone.set()
            return
        logger.debug("connection to %s ends: %s", self._remote_address, reason)
        self._closed = True
        self.close_reason = reason
        if reason != "closed locally":
            self._gone.set()
            self._spawn(quiet_close(self._pc))
        if not self._peer_hello.done():
            self._peer_hello.set_exception(HandshakeError(f"handshake failed: {reason}"))
        self._incoming_changed.fire()
        self._writable.fire()
        for stream in self._streams.values():
            stream.changed.fire()
        for callback in self._on_closed:
            callback(self)

    # --- sending ---

    async def wait_writable(self) -> None:
        while self._channel.bufferedAmount > self.settings.high_water_bytes:
            if self._closed:
                raise ConnectionClosed(self.close_reason)
            await self._writable.wait()

    def send_wire(self, wire: bytes) -> None:
        try:
            self._channel.send(wire)
        except Exception as exc:  # aiortc raises InvalidStateError once the channel is gone
            self._die(f"send failed: {exc!r}")
            raise ConnectionClosed(self.close_reason) from exc

    def send_control(self, kind: Kind, stream_id: int, payload: bytes = b"") -> None:
        """Control frames bypass backpressure: they are small and unblock the peer."""
        if self._channel.readyState == "open":
            with contextlib.suppress(ConnectionClosed):
                self.send_wire(HEADER.pack(kind, stream_id) + payload)

    def forget_if_done(self, stream: MuxStream) -> None:
        if stream.is_done:
            self._streams.pop(stream.stream_id, None)

    # --- receiving ---

    def _on_message(self, data: bytes | str) -> None:
        self._last_heard_s = time.monotonic()
        try:
            if isinstance(data, str) or len(data) < HEADER.size:
                raise HandshakeError("malformed frame")
            kind, stream_id = HEADER.unpack_from(data)
            payload = memoryview(data)[HEADER.size :]
            if not self._peer_hello.done():
                self._on_handshake_frame(kind, payload)
            elif not self._closed:
                self._dispatch(kind, stream_id, payload)
            elif kind == Kind.GOAWAY:
                self._gone.set()  # both sides closed at once; nothing more will come
        except HandshakeError as exc:
            self._refuse(str(exc))
        except (ValueError, struct.error, msgspec.DecodeError) as exc:
            self._refuse(f"protocol violation: {exc}")

    def _on_handshake_frame(self, kind: int, payload: memoryview) -> None:
        if kind == Kind.REFUSE:
            raise HandshakeError(f"the peer refused: {bytes(payload).decode(errors='replace')}")
        if kind != Kind.HELLO or self._verify is None:
            raise HandshakeError("expected a hello")
        hello = msgspec.msgpack.decode(payload, type=Hello)
        if hello.window_bytes < 2 * self.settings.chunk_bytes or hello.max_streams < 1:
            raise HandshakeError("the peer's flow-control window is too small")
        try:
            self._verify(hello)
        except IdentityMismatch as exc:
            self._peer_hello.set_exception(exc)
            self._refuse("identity")
            return
        self._peer_hello.set_result(hello)

    def _dispatch(self, kind: int, stream_id: int, payload: memoryview) -> None:
        if kind == Kind.PING:
            self.send_control(Kind.PONG, 0)
        elif kind == Kind.OPEN:
            self._on_open(stream_id)
        elif kind in (Kind.GOAWAY, Kind.REFUSE):
            self._die("the peer closed the connection")
        elif (stream := self._streams.get(stream_id)) is None or kind == Kind.PONG:
            pass  # frames still in flight for a stream we already forgot
        elif kind == Kind.MSG:
            if not stream.local_closed:
                stream.on_message_start(payload)
        elif kind == Kind.CONT:
            if not stream.local_closed:
                stream.on_body(payload, len(payload))
        elif kind == Kind.CREDIT:
            stream.on_credit(CREDIT.unpack(payload)[0])
        elif kind == Kind.FIN:
            stream.on_fin()
            self.forget_if_done(stream)
        elif kind == Kind.RESET:
            stream.on_reset()
            self.forget_if_done(stream)
        else:
            raise HandshakeError(f"unknown frame kind {kind}")

    def _on_open(self, stream_id: int) -> None:
        remote_parity = 0 if self._is_dialer else 1
        if stream_id % 2 != remote_parity or stream_id <= self._last_remote_id:
            raise HandshakeError(f"bad stream id {stream_id}")
        self._last_remote_id = stream_id
        inbound = sum(1 for i in self._streams if i % 2 == remote_parity)
        if inbound >= self.settings.limits.max_streams:
            self.send_control(Kind.RESET, stream_id)
            return
        stream = MuxStream(self, stream_id, self._hello().window_bytes)
        self._streams[stream_id] = stream
        self._incoming.append(stream)
        self._incoming_changed.fire()

    def _refuse(self, reason: str) -> None:
        logger.warning("closing WebRTC connection to %s: %s", self._remote_address, reason)
        self.send_control(Kind.REFUSE, 0, reason.encode()[:200])
        if not self._peer_hello.done():
            self._peer_hello.set_exception(HandshakeError(reason))
        self._die(reason)

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def quiet_close(pc: RTCPeerConnection) -> None:
    """Close `pc`, ignoring whatever aiortc raises while tearing down."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(pc.close(), timeout=5.0)
