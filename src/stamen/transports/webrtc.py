"""WebRTC transport: streams multiplexed over one aiortc data channel, for hosts behind NAT.

Addresses are `webrtc://RELAY_HOST:PORT/PUBLIC_KEY_HEX`: the relay carries the SDP offer and
answer (see `signaling`), then ICE finds a direct UDP path. A listener registers its key at
the relay (`listen("webrtc://RELAY_HOST:PORT", handler)`) and keeps that connection open.

Design. Streams share one data channel rather than one channel each: opening 100 streams
and echoing 1 KB on each took 96 ms through this mux vs 123 ms for 100 raw aiortc channels
(DCEP open per channel) on the dev VM, and aiortc cannot pause a channel's reader, so a
channel per stream would still need credit flow control. The pieces:

- `webrtc_config`: `WebRTCConfig`, `IceServer`, `MuxSettings`, aiortc's configuration;
- `webrtc_auth`: the `Hello` proof binding each peer's key to this DTLS session;
- `webrtc_mux`: the data-channel pipe of the multiplexer core shared with tcp
  (`mux_core`: packet format, stream ids, credit, reassembly within `Limits`,
  keepalives; `mux_stream`: its asyncio streams): one core packet of at most 64 KiB per
  data-channel message, `bufferedAmount` backpressure, the `Hello` exchange;
- this module: dialing through the relay, listening, and the handshake's order of steps.

Loopback tests pass no ICE servers (host candidates only); never the public STUN default.
This module knows nothing about tensors or message schemas.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from urllib.parse import urlsplit

from aiortc import RTCDataChannel, RTCPeerConnection
from aiortc import RTCSessionDescription as SDP

from stamen.transports.base import (
    ConnectError,
    ConnectionHandler,
    Credentials,
    IdentityMismatch,
    Limits,
    Listener,
    Transport,
)
from stamen.transports.mux_stream import MuxStream
from stamen.transports.signaling import (
    IncomingOffer,
    RelaySignaling,
    Signaling,
    SignalingError,
    SignalingFactory,
)
from stamen.transports.webrtc_auth import (
    ANSWERER_ROLE,
    OFFERER_ROLE,
    Hello,
    fingerprints,
    make_hello,
    verify_hello,
)
from stamen.transports.webrtc_config import (
    SCHEME,
    IceServer,
    MuxSettings,
    WebRTCConfig,
    enlarge_udp_buffers,
    new_peer_connection,
    with_limits,
)
from stamen.transports.webrtc_mux import MuxConnection, quiet_close

__all__ = [
    "SCHEME",
    "Hello",
    "IceServer",
    "MuxConnection",
    "MuxSettings",
    "MuxStream",
    "WebRTCConfig",
    "WebRTCListener",
    "WebRTCTransport",
    "fingerprints",
    "make_hello",
    "parse_address",
    "verify_hello",
]

logger = logging.getLogger(__name__)

_CHANNEL_ID = 0


def parse_address(address: str) -> tuple[str, bytes | None]:
    """`webrtc://host:port[/keyhex]` -> (`host:port`, key or None)."""
    parts = urlsplit(address)
    if parts.scheme != SCHEME or not parts.netloc:
        raise ConnectError(f"not a webrtc address: {address!r}")
    key_hex = parts.path.strip("/")
    try:
        key = bytes.fromhex(key_hex) if key_hex else None
    except ValueError as exc:
        raise ConnectError(f"bad public key in {address!r}") from exc
    if key is not None and len(key) != 32:
        raise ConnectError(f"public key in {address!r} is not 32 bytes")
    return parts.netloc, key


class WebRTCTransport(Transport):
    """Dials `webrtc://relay/key` addresses and listens through a relay."""

    name = SCHEME

    def __init__(
        self,
        credentials: Credentials,
        *,
        limits: Limits | None = None,
        config: WebRTCConfig | None = None,
        signaling_factory: SignalingFactory | None = None,
    ) -> None:
        self.credentials = credentials
        self.config = config or WebRTCConfig()
        if limits is not None:
            self.config = with_limits(self.config, limits)
        self._signaling_factory: SignalingFactory = signaling_factory or RelaySignaling
        self._connections: set[MuxConnection] = set()
        self._listeners: set[WebRTCListener] = set()

    def _new_signaling(self, relay: str) -> Signaling:
        return self._signaling_factory(relay, self.credentials)

    def _new_peer_connection(self) -> RTCPeerConnection:
        return new_peer_connection(self.config)

    async def connect(
        self,
        address: str,
        *,
        expected_public_key: bytes | None = None,
        timeout_s: float = 10.0,
    ) -> MuxConnection:
        relay, target = parse_address(address)
        if target is None:
            raise ConnectError(f"{address!r} names no peer key")
        if expected_public_key is not None and expected_public_key != target:
            raise IdentityMismatch("the address names another key than the one expected")
        pc = self._new_peer_connection()
        channel = _open_channel(pc)
        signaling = self._new_signaling(relay)
        try:
            async with asyncio.timeout(timeout_s):
                await pc.setLocalDescription(await pc.createOffer())
                enlarge_udp_buffers(pc, self.config.udp_buffer_bytes)
                offer_sdp = pc.localDescription.sdp
                await signaling.connect(timeout_s)
                answer_sdp = await signaling.send_offer(target, offer_sdp, timeout_s=timeout_s)
                await signaling.close()
                await pc.setRemoteDescription(SDP(answer_sdp, "answer"))
                connection = await self._handshake(
                    pc, channel, OFFERER_ROLE, offer_sdp, answer_sdp, target, address
                )
        except TimeoutError as exc:
            await quiet_close(pc)
            raise ConnectError(f"connecting to {address} timed out") from exc
        except ConnectError:
            await quiet_close(pc)
            raise
        except Exception as exc:
            await quiet_close(pc)
            raise ConnectError(f"connecting to {address} failed: {exc}") from exc
        finally:
            await signaling.close()
        self._track(connection)
        return connection

    async def _handshake(
        self,
        pc: RTCPeerConnection,
        channel: RTCDataChannel,
        role: bytes,
        offer_sdp: str,
        answer_sdp: str,
        expected_key: bytes | None,
        remote_address: str,
    ) -> MuxConnection:
        """Exchange and check `Hello`s (see `webrtc_auth`); returns a running connection."""
        peer_role = ANSWERER_ROLE if role == OFFERER_ROLE else OFFERER_ROLE
        hello = make_hello(self.credentials, role, offer_sdp, answer_sdp, self.config.mux)

        def verify(peer_hello: Hello) -> None:
            verify_hello(
                peer_hello, self.credentials, peer_role, offer_sdp, answer_sdp, expected_key
            )

        connection = MuxConnection(
            pc,
            channel,
            is_dialer=role == OFFERER_ROLE,
            settings=self.config.mux,
            remote_address=remote_address,
        )
        await connection.handshake(hello, verify)
        return connection

    def _track(self, connection: MuxConnection) -> None:
        self._connections.add(connection)
        connection.on_closed(self._connections.discard)

    async def listen(self, address: str, handler: ConnectionHandler) -> WebRTCListener:
        relay, key = parse_address(address)
        if key is not None and key != self.credentials.public_key:
            raise ConnectError("cannot listen under another peer's key")
        listener = WebRTCListener(self, relay, handler)
        await listener.start()
        self._listeners.add(listener)
        return listener

    async def aclose(self) -> None:
        for listener in list(self._listeners):
            await listener.close()
        self._listeners.clear()
        for connection in list(self._connections):
            await connection.close()


class WebRTCListener(Listener):
    """Keeps a registration at the relay (re-registering after a drop) and answers offers."""

    def __init__(self, transport: WebRTCTransport, relay: str, handler: ConnectionHandler):
        self._transport = transport
        self._relay = relay
        self._handler = handler
        self._tasks: set[asyncio.Task[None]] = set()
        self._connections: set[MuxConnection] = set()
        self._signaling: Signaling | None = None
        self._closed = False

    @property
    def addresses(self) -> list[str]:
        return [f"{SCHEME}://{self._relay}/{self._transport.credentials.public_key.hex()}"]

    async def start(self) -> None:
        # The first registration fails loudly; later ones are retried in the background.
        self._signaling = await self._register()
        self._spawn(self._serve_relay())

    async def _register(self) -> Signaling:
        signaling = self._transport._new_signaling(self._relay)
        try:
            await signaling.connect()
            await signaling.register()
        except BaseException:
            await signaling.close()
            raise
        return signaling

    async def _serve_relay(self) -> None:
        backoff_s = 0.5
        while not self._closed:
            try:
                if self._signaling is None:
                    self._signaling = await self._register()
                    backoff_s = 0.5
                while True:
                    self._spawn(self._answer(await self._signaling.next_offer()))
            except SignalingError as exc:
                if self._closed:
                    return
                logger.info("relay %s lost (%s); re-registering", self._relay, exc)
            if self._signaling is not None:
                await self._signaling.close()
                self._signaling = None
            await asyncio.sleep(backoff_s)
            backoff_s = min(2 * backoff_s, self._transport.config.backoff_max_s)

    async def _answer(self, offer: IncomingOffer) -> None:
        transport = self._transport
        pc = transport._new_peer_connection()
        channel = _open_channel(pc)
        try:
            async with asyncio.timeout(transport.config.handshake_timeout_s):
                await pc.setRemoteDescription(SDP(offer.sdp, "offer"))
                await pc.setLocalDescription(await pc.createAnswer())
                enlarge_udp_buffers(pc, transport.config.udp_buffer_bytes)
                answer_sdp = pc.localDescription.sdp
                await offer.answer(answer_sdp)
                connection = await transport._handshake(
                    pc, channel, ANSWERER_ROLE, offer.sdp, answer_sdp, None, ""
                )
        except Exception as exc:
            logger.info("refused an incoming WebRTC connection: %s", exc)
            await quiet_close(pc)
            return
        self._connections.add(connection)
        try:
            await self._handler(connection)
        except Exception:
            logger.exception("connection handler failed")
        finally:
            self._connections.discard(connection)
            await connection.close()

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._signaling is not None:
            await self._signaling.close()
        for connection in list(self._connections):
            await connection.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._transport._listeners.discard(self)


def _open_channel(pc: RTCPeerConnection) -> RTCDataChannel:
    # Negotiated on both sides: no DCEP round trip, and the answerer needs no event.
    return pc.createDataChannel("stamen", ordered=True, negotiated=True, id=_CHANNEL_ID)
