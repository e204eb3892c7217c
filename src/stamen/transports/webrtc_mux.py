"""The data-channel pipe: the multiplexer core (`mux_core`) over one aiortc data channel,
the `Connection` of the WebRTC transport from the `Hello` exchange to the last `GOAWAY`.

1. Framing: each data-channel message is exactly one core packet (`packets`), at most
   `chunk_bytes` (64 KiB: what SCTP peers accept) long, header included; the core cuts
   messages to that size. Ordering and reliability are the channel's (ordered, reliable).
2. Handshake: before the core exists, only HELLO and REFUSE packets are accepted. `Hello`s
   are exchanged and checked by the `verify` callback the transport passes in (see
   `webrtc_auth`); the peer's limits, window and packet size then configure the core. A
   refusal carries its reason to the peer in a REFUSE packet.
3. Backpressure, channel-wide: after each packet a sender waits while the channel's
   `bufferedAmount` is above `high_water_bytes`, woken by `bufferedamountlow` at
   `low_water_bytes`, so nothing queues without bound inside aiortc either. Per-stream
   credit, stream ids, slots and termination are the core's.
4. Liveness: the keepalive task asks the core every `keepalive_s`; a peer silent for
   `dead_after_s`, a closed channel or a failed ICE connection closes the connection
   (`ConnectionClosed` for every waiter).

This module knows nothing about signalling, SDP or ICE configuration; it is handed an
`RTCPeerConnection` and its channel, and owns both from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine

import msgspec
from aiortc import RTCDataChannel, RTCPeerConnection

from stamen.transports.base import (
    ConnectionClosed,
    HandshakeError,
    IdentityMismatch,
    Limits,
)
from stamen.transports.flow import Signal
from stamen.transports.mux_core import CoreSettings, Liveness, MuxCore, PeerSettings
from stamen.transports.mux_stream import MuxSession
from stamen.transports.packets import PACKET, Kind
from stamen.transports.webrtc_auth import Hello
from stamen.transports.webrtc_config import SCHEME, MuxSettings

logger = logging.getLogger(__name__)

MIN_PACKET_BYTES = 1024  # a peer announcing less could not carry a message header


def core_settings(settings: MuxSettings) -> CoreSettings:
    return CoreSettings(
        limits=settings.limits,
        window_bytes=settings.window_bytes,
        max_payload_bytes=settings.chunk_bytes - PACKET.size,
        keepalive_interval_s=settings.keepalive_s,
        keepalive_timeout_s=settings.dead_after_s,
    )


def handshake_packet(kind: int, payload: bytes) -> bytes:
    return PACKET.pack(kind, 0, 0, 0, len(payload)) + payload


class MuxConnection(MuxSession):
    """Streams over one data channel of one `RTCPeerConnection`; owns both."""

    core: MuxCore  # set once the peer's Hello is accepted

    def __init__(
        self,
        pc: RTCPeerConnection,
        channel: RTCDataChannel,
        *,
        is_dialer: bool,
        settings: MuxSettings,
        remote_address: str,
    ) -> None:
        super().__init__()
        self._pc = pc
        self._channel = channel
        self.settings = settings
        self._is_dialer = is_dialer
        self._remote_address = remote_address
        self._writable = Signal()
        self.close_reason: str | None = None
        self._gone = asyncio.Event()
        self._peer_hello: asyncio.Future[Hello] = self._loop.create_future()
        self._verify: Callable[[Hello], None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._on_closed: list[Callable[[MuxConnection], None]] = []
        channel.bufferedAmountLowThreshold = settings.low_water_bytes
        channel.on("message", self._on_message)
        channel.on("bufferedamountlow", self._writable.fire)
        channel.on("close", lambda: self._die("the data channel closed"))
        pc.on("connectionstatechange", self._on_state)

    # --- Connection API ------------------------------------------------------------------

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
        return self.close_reason is not None or (
            self._peer_hello.done() and not self._peer_hello.exception() and self.core.is_closed
        )

    def raise_if_closed(self) -> None:
        if self.close_reason is not None:
            raise ConnectionClosed(self.close_reason)
        self._hello()
        self.core.raise_if_closed()

    async def close(self) -> None:
        if self.close_reason is None:
            if self._peer_hello.done() and not self._peer_hello.exception():
                self.core.go_away()
                self.flush()
            self._die("closed locally")
            # Let what is queued reach the peer; it closes its side when GOAWAY arrives.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._gone.wait(), self.settings.close_linger_s)
        await quiet_close(self._pc)
        for task in list(self._tasks):
            task.cancel()

    def on_closed(self, callback: Callable[[MuxConnection], None]) -> None:
        self._on_closed.append(callback)

    # --- handshake and liveness ----------------------------------------------------------

    async def handshake(self, hello: Hello, verify: Callable[[Hello], None]) -> None:
        """Exchange and check `Hello`s, then start keepalives. Caller bounds the time."""
        self._verify = verify
        if self._channel.readyState != "open":
            opened = self._loop.create_future()
            self._channel.on("open", lambda: None if opened.done() else opened.set_result(None))
            await asyncio.wait([opened, self._peer_hello], return_when=asyncio.FIRST_COMPLETED)
        if not self._peer_hello.done() or self._peer_hello.exception() is None:
            self._send_raw(handshake_packet(Kind.HELLO, msgspec.msgpack.encode(hello)))
        await self._peer_hello
        self._spawn(self._keepalive())

    def _hello(self) -> Hello:
        if not self._peer_hello.done() or self._peer_hello.exception() is not None:
            raise ConnectionClosed("the handshake has not completed")
        return self._peer_hello.result()

    def _on_handshake_packet(self, kind: int, payload: memoryview) -> None:
        if kind == Kind.REFUSE:
            raise HandshakeError(f"the peer refused: {bytes(payload).decode(errors='replace')}")
        if kind != Kind.HELLO or self._verify is None:
            raise HandshakeError("expected a hello")
        hello = msgspec.msgpack.decode(payload, type=Hello)
        if hello.window_bytes < 2 * self.settings.chunk_bytes or hello.max_streams < 1:
            raise HandshakeError("the peer's flow-control window is too small")
        if hello.max_packet_bytes < MIN_PACKET_BYTES:
            raise HandshakeError("the peer's packets are too small")
        try:
            self._verify(hello)
        except IdentityMismatch as exc:
            self._peer_hello.set_exception(exc)
            self._refuse("identity")
            return
        packet_bytes = min(hello.max_packet_bytes, self.settings.chunk_bytes)
        peer = PeerSettings(
            Limits(hello.max_frames, hello.max_message_bytes, hello.max_streams),
            hello.window_bytes,
            packet_bytes - PACKET.size,
        )
        self.core = MuxCore(
            core_settings(self.settings), peer, is_dialer=self._is_dialer, now_s=self._loop.time()
        )
        self._peer_hello.set_result(hello)

    async def _keepalive(self) -> None:
        while self.close_reason is None:
            await asyncio.sleep(self.settings.keepalive_s)
            match self.core.liveness(self._loop.time()):
                case Liveness.SILENT:
                    self._die("the peer stopped answering")
                    await quiet_close(self._pc)
                    return
                case Liveness.PINGED:
                    self.flush()

    def _on_state(self) -> None:
        if self._pc.connectionState in ("failed", "closed"):
            self._die(f"the WebRTC connection {self._pc.connectionState}")

    # --- sending -------------------------------------------------------------------------

    def flush(self) -> None:
        outbox = self.core.outbox
        if not outbox:
            return
        packets = [head if not parts else b"".join((head, *parts)) for head, parts, _ in outbox]
        outbox.clear()
        for wire in packets:
            if not self._send_raw(wire):
                return

    def _send_raw(self, wire: bytes) -> bool:
        if self._channel.readyState != "open":
            return False
        try:
            self._channel.send(wire)
        except Exception as exc:  # aiortc raises InvalidStateError once the channel is gone
            self._die(f"send failed: {exc!r}")
            return False
        return True

    @property
    def write_paused(self) -> bool:
        return self._channel.bufferedAmount > self.settings.high_water_bytes

    async def drain(self) -> None:
        while self._channel.bufferedAmount > self.settings.high_water_bytes:
            self.raise_if_closed()
            await self._writable.wait()
        self.raise_if_closed()

    # --- receiving -----------------------------------------------------------------------

    def _on_message(self, data: bytes | str) -> None:
        try:
            if isinstance(data, str) or len(data) < PACKET.size:
                raise HandshakeError("malformed packet")
            packet = memoryview(data)
            kind = data[0]
            if not self._peer_hello.done():
                self._on_handshake_packet(kind, packet[PACKET.size :])
            elif self.close_reason is not None:
                if kind == Kind.GOAWAY:
                    self._gone.set()  # both sides closed at once; nothing more will come
            elif kind == Kind.REFUSE:
                reason = bytes(packet[PACKET.size :]).decode(errors="replace")
                self._die(f"the peer refused: {reason}")
            else:
                core = self.core
                core.last_heard_s = self._loop.time()
                core.receive_packet(packet)
                if core.events:
                    self.dispatch()
                if core.outbox:
                    self.flush()
        except HandshakeError as exc:
            self._refuse(str(exc))
        except (ValueError, msgspec.DecodeError) as exc:
            self._refuse(f"protocol violation: {exc}")

    # --- teardown ------------------------------------------------------------------------

    def on_peer_gone(self, reason: str, *, violation: bool) -> None:
        if violation:
            self._refuse(reason)
        else:
            self._gone.set()
            self._die(reason)

    def _refuse(self, reason: str) -> None:
        logger.warning("closing WebRTC connection to %s: %s", self._remote_address, reason)
        self._send_raw(handshake_packet(Kind.REFUSE, reason.encode()[:200]))
        if not self._peer_hello.done():
            self._peer_hello.set_exception(HandshakeError(reason))
        self._die(reason)

    def _die(self, reason: str) -> None:
        if self.close_reason is not None:
            self._gone.set()
            return
        logger.debug("connection to %s ends: %s", self._remote_address, reason)
        self.close_reason = reason
        if reason != "closed locally":
            self._gone.set()
            self._spawn(quiet_close(self._pc))
        if not self._peer_hello.done():
            self._peer_hello.set_exception(HandshakeError(f"handshake failed: {reason}"))
        elif self._peer_hello.exception() is None:
            self.end_session(reason)
        self.changed.fire()
        self._writable.fire()
        for callback in self._on_closed:
            callback(self)

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def quiet_close(pc: RTCPeerConnection) -> None:
    """Close `pc`, ignoring whatever aiortc raises while tearing down."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(pc.close(), timeout=5.0)
