"""WebRTC signalling: carry SDP offers and answers between peers that cannot dial each other.

`Signaling` is the seam the WebRTC transport uses: a dialer sends an offer to a target
public key and waits for the answer; a registered peer receives offers and answers them.
`RelaySignaling` implements it over a plain TCP connection to a `SignalingRelay` (run by a
reachable peer, e.g. `swarm-bootstrap`). A host behind NAT keeps its relay connection open
(with keepalives) and is reachable through it.

Relay protocol: every message is a 4-byte big-endian length followed by a msgpack-encoded
`RelayMessage`. On accept the relay sends a `Challenge`; a peer that wants to receive offers
answers `Register` with an ed25519 signature over the challenge (so nobody can register a key
it does not hold). A registration of the same key replaces the older one. Dialers need not
register: they send `Offer`s naming a target key; the relay forwards them under its own
request id and routes the `Answer` (or a `Refused`) back.

The relay is not trusted with identity: SDPs carry DTLS fingerprints that the transport
authenticates end to end, so a lying relay can only deny service. This module knows nothing
about SDP contents, data channels or tensors.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine
from dataclasses import dataclass

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from stamen.transports.base import ConnectError, Credentials, HandshakeError, TransportError

logger = logging.getLogger(__name__)

_REGISTER_CONTEXT = b"stamen-relay-register-v1"
_LENGTH_BYTES = 4


class SignalingError(ConnectError):
    """The signalling path failed (relay unreachable, protocol violation, timeout)."""


class PeerUnreachable(SignalingError):
    """The relay does not know the target key, or the target refused the offer."""


# --- wire messages -------------------------------------------------------------------


class Challenge(msgspec.Struct, tag="challenge", frozen=True):
    nonce: bytes


class Register(msgspec.Struct, tag="register", frozen=True):
    public_key: bytes
    signature: bytes


class Registered(msgspec.Struct, tag="registered", frozen=True):
    pass


class Offer(msgspec.Struct, tag="offer", frozen=True):
    request_id: int
    target: bytes
    sdp: str


class Answer(msgspec.Struct, tag="answer", frozen=True):
    request_id: int
    sdp: str


class Refused(msgspec.Struct, tag="refused", frozen=True):
    request_id: int
    reason: str


class Ping(msgspec.Struct, tag="ping", frozen=True):
    pass


class Pong(msgspec.Struct, tag="pong", frozen=True):
    pass


RelayMessage = Challenge | Register | Registered | Offer | Answer | Refused | Ping | Pong

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(RelayMessage)


def _frame(message: RelayMessage) -> bytes:
    payload = _encoder.encode(message)
    return len(payload).to_bytes(_LENGTH_BYTES, "big") + payload


async def _read_message(reader: asyncio.StreamReader, max_bytes: int) -> RelayMessage:
    """One message; raises `SignalingError` on oversize or garbage, before allocating."""
    try:
        length = int.from_bytes(await reader.readexactly(_LENGTH_BYTES), "big")
        if length > max_bytes:
            raise SignalingError(f"signalling message of {length} bytes exceeds {max_bytes}")
        return _decoder.decode(await reader.readexactly(length))
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise SignalingError("signalling connection closed") from exc
    except msgspec.DecodeError as exc:
        raise SignalingError(f"malformed signalling message: {exc}") from exc


def _verify(public_key: bytes, signature: bytes, data: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class RelayLimits:
    """Caps that keep one relay safe from misbehaving or numerous peers."""

    max_message_bytes: int = 64 * 1024
    max_registrations: int = 10_000
    max_pending_offers_per_connection: int = 64
    handshake_timeout_s: float = 10.0
    offer_timeout_s: float = 20.0
    # Registered peers ping every `RelaySignaling.keepalive_s`; a silent one is dropped.
    idle_timeout_s: float = 60.0


# --- the seam ------------------------------------------------------------------------


@dataclass
class IncomingOffer:
    """An offer delivered to a registered peer; answer or refuse it exactly once."""

    sdp: str
    request_id: int
    _signaling: RelaySignaling

    async def answer(self, sdp: str) -> None:
        await self._signaling._send(Answer(self.request_id, sdp))

    async def refuse(self, reason: str) -> None:
        await self._signaling._send(Refused(self.request_id, reason))


class Signaling(ABC):
    """Carries offers to a target key and delivers offers addressed to us."""

    @abstractmethod
    async def connect(self, timeout_s: float = 10.0) -> None:
        """Open the signalling path. Raises `SignalingError`."""

    @abstractmethod
    async def send_offer(self, target_public_key: bytes, sdp: str, *, timeout_s: float) -> str:
        """Deliver `sdp` to the peer holding `target_public_key`; return its answer SDP.
        Raises `PeerUnreachable` or `SignalingError`."""

    @abstractmethod
    async def register(self, timeout_s: float = 10.0) -> None:
        """Become reachable: offers for our key are delivered to `next_offer`."""

    @abstractmethod
    async def next_offer(self) -> IncomingOffer:
        """The next offer addressed to us. Raises `SignalingError` once signalling is lost."""

    @abstractmethod
    async def close(self) -> None: ...


SignalingFactory = Callable[[str, Credentials], Signaling]
"""Builds the signalling for one peer address (e.g. a relay's `host:port`) and key."""


class RelaySignaling(Signaling):
    """`Signaling` through one TCP connection to a `SignalingRelay`."""

    def __init__(
        self,
        relay_address: str,
        credentials: Credentials,
        *,
        limits: RelayLimits | None = None,
        keepalive_s: float = 15.0,
        max_queued_offers: int = 32,
    ) -> None:
        host, _, port = relay_address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"relay address must be host:port, got {relay_address!r}")
        self._host, self._port = host.strip("[]"), int(port)
        self._credentials = credentials
        self._limits = limits or RelayLimits()
        self._keepalive_s = keepalive_s
        self._writer: asyncio.StreamWriter | None = None
        self._nonce = b""
        self._request_ids = itertools.count(1)
        self._answers: dict[int, asyncio.Future[str]] = {}
        self._registered: asyncio.Future[None] | None = None
        self._offers: asyncio.Queue[IncomingOffer] = asyncio.Queue(max_queued_offers)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()

    @property
    def is_closed(self) -> bool:
        return self._closed.is_set()

    async def connect(self, timeout_s: float = 10.0) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                reader, self._writer = await asyncio.open_connection(self._host, self._port)
                first = await _read_message(reader, self._limits.max_message_bytes)
        except (OSError, TimeoutError) as exc:
            await self.close()
            raise SignalingError(f"cannot reach relay {self._host}:{self._port}: {exc}") from exc
        if not isinstance(first, Challenge):
            await self.close()
            raise SignalingError("relay did not open with a challenge")
        self._nonce = first.nonce
        self._spawn(self._read_loop(reader))

    async def register(self, timeout_s: float = 10.0) -> None:
        self._registered = asyncio.get_running_loop().create_future()
        signature = self._credentials.private_key.sign(_REGISTER_CONTEXT + self._nonce)
        await self._send(Register(self._credentials.public_key, signature))
        try:
            async with asyncio.timeout(timeout_s):
                await self._registered
        except TimeoutError as exc:
            raise SignalingError("relay did not confirm the registration") from exc
        self._spawn(self._keepalive_loop())

    async def send_offer(self, target_public_key: bytes, sdp: str, *, timeout_s: float) -> str:
        request_id = next(self._request_ids)
        answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._answers[request_id] = answer
        try:
            await self._send(Offer(request_id, target_public_key, sdp))
            async with asyncio.timeout(timeout_s):
                return await answer
        except TimeoutError as exc:
            raise SignalingError("no answer to the offer in time") from exc
        finally:
            self._answers.pop(request_id, None)

    async def next_offer(self) -> IncomingOffer:
        closed = asyncio.ensure_future(self._closed.wait())
        offer = asyncio.ensure_future(self._offers.get())
        try:
            await asyncio.wait([closed, offer], return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            if not offer.done():
                offer.cancel()
        if offer.done() and not offer.cancelled():
            return offer.result()
        raise SignalingError("relay connection lost")

    async def close(self) -> None:
        self._closed.set()
        for task in list(self._tasks):
            task.cancel()
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        self._fail_waiters(SignalingError("signalling closed"))

    async def _send(self, message: RelayMessage) -> None:
        if self._writer is None or self._closed.is_set():
            raise SignalingError("signalling is not connected")
        try:
            self._writer.write(_frame(message))
            await asyncio.wait_for(self._writer.drain(), timeout=self._limits.offer_timeout_s)
        except (OSError, TimeoutError) as exc:
            raise SignalingError(f"relay write failed: {exc}") from exc

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                self._dispatch(await _read_message(reader, self._limits.max_message_bytes))
        except SignalingError as exc:
            logger.debug("relay connection ended: %s", exc)
        finally:
            self._closed.set()
            self._fail_waiters(SignalingError("relay connection lost"))

    def _dispatch(self, message: RelayMessage) -> None:
        match message:
            case Answer(request_id, sdp):
                future = self._answers.get(request_id)
                if future is not None and not future.done():
                    future.set_result(sdp)
            case Refused(request_id, reason):
                future = self._answers.get(request_id)
                if future is not None and not future.done():
                    future.set_exception(PeerUnreachable(reason))
            case Offer(request_id, _, sdp):
                try:
                    self._offers.put_nowait(IncomingOffer(sdp, request_id, self))
                except asyncio.QueueFull:
                    self._spawn(self._send(Refused(request_id, "busy")))
            case Registered():
                if self._registered is not None and not self._registered.done():
                    self._registered.set_result(None)
            case Ping():
                self._spawn(self._send(Pong()))
            case _:
                pass

    async def _keepalive_loop(self) -> None:
        with contextlib.suppress(SignalingError):
            while True:
                await asyncio.sleep(self._keepalive_s)
                await self._send(Ping())

    def _fail_waiters(self, error: TransportError) -> None:
        for future in self._answers.values():
            if not future.done():
                future.set_exception(error)
        if self._registered is not None and not self._registered.done():
            self._registered.set_exception(error)


# --- the relay -------------------------------------------------------------------------


class _RelayPeer:
    """One TCP connection to the relay."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.public_key: bytes | None = None
        self.pending_offers = 0

    def send(self, message: RelayMessage) -> None:
        # Relay messages are small and capped; a peer that stops reading is dropped by
        # the idle timeout of its own reader, so the write buffer stays bounded in practice.
        if not self.writer.is_closing():
            self.writer.write(_frame(message))


class SignalingRelay:
    """Forwards offers and answers between peers; run it on a reachable node."""

    def __init__(self, limits: RelayLimits | None = None) -> None:
        self._limits = limits or RelayLimits()
        self._registered: dict[bytes, _RelayPeer] = {}
        # relay request id -> (dialer, dialer's request id, target host, expiry handle)
        self._routes: dict[int, tuple[_RelayPeer, int, _RelayPeer, asyncio.TimerHandle]] = {}
        self._request_ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        if self._server is None:
            raise TransportError("relay is not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    @property
    def registered_keys(self) -> list[bytes]:
        return list(self._registered)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = await asyncio.start_server(self._handle, host, port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> SignalingRelay:
        if self._server is None:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        peer = _RelayPeer(writer)
        nonce = os.urandom(32)
        try:
            peer.send(Challenge(nonce))
            while True:
                timeout_s = (
                    self._limits.idle_timeout_s
                    if peer.public_key is not None
                    else self._limits.handshake_timeout_s
                )
                async with asyncio.timeout(timeout_s):
                    message = await _read_message(reader, self._limits.max_message_bytes)
                self._on_message(peer, nonce, message)
        except (SignalingError, TimeoutError, HandshakeError) as exc:
            logger.debug("relay peer dropped: %s", exc)
        finally:
            self._forget(peer)
            writer.close()
            if task is not None:
                self._handlers.discard(task)

    def _on_message(self, peer: _RelayPeer, nonce: bytes, message: RelayMessage) -> None:
        match message:
            case Register(public_key, signature):
                self._register(peer, nonce, public_key, signature)
            case Offer(request_id, target, sdp):
                self._forward_offer(peer, request_id, target, sdp)
            case Answer(request_id, sdp):
                self._route_back(peer, request_id, Answer, sdp)
            case Refused(request_id, reason):
                self._route_back(peer, request_id, Refused, reason)
            case Ping():
                peer.send(Pong())
            case Pong():
                pass
            case _:
                raise SignalingError(f"unexpected {type(message).__name__} from a peer")

    def _register(self, peer: _RelayPeer, nonce: bytes, key: bytes, signature: bytes) -> None:
        if not _verify(key, signature, _REGISTER_CONTEXT + nonce):
            raise HandshakeError("registration signature does not verify")
        if key not in self._registered and len(self._registered) >= self._limits.max_registrations:
            raise SignalingError("relay is full")
        previous = self._registered.get(key)
        if previous is not None and previous is not peer:
            previous.writer.close()
        if peer.public_key is not None and peer.public_key != key:
            self._registered.pop(peer.public_key, None)
        peer.public_key = key
        self._registered[key] = peer
        peer.send(Registered())

    def _forward_offer(self, peer: _RelayPeer, request_id: int, target: bytes, sdp: str) -> None:
        host = self._registered.get(target)
        if host is None:
            peer.send(Refused(request_id, "target is not registered at this relay"))
            return
        if peer.pending_offers >= self._limits.max_pending_offers_per_connection:
            peer.send(Refused(request_id, "too many pending offers"))
            return
        relay_id = next(self._request_ids)
        expiry = asyncio.get_running_loop().call_later(
            self._limits.offer_timeout_s, self._expire, relay_id
        )
        self._routes[relay_id] = (peer, request_id, host, expiry)
        peer.pending_offers += 1
        host.send(Offer(relay_id, target, sdp))

    def _route_back(self, host: _RelayPeer, relay_id: int, kind: type, payload: str) -> None:
        route = self._routes.get(relay_id)
        if route is None or route[2] is not host:
            return  # expired, the dialer went away, or not addressed to this peer
        del self._routes[relay_id]
        dialer, request_id, _, expiry = route
        expiry.cancel()
        dialer.pending_offers -= 1
        dialer.send(kind(request_id, payload))

    def _expire(self, relay_id: int) -> None:
        route = self._routes.pop(relay_id, None)
        if route is not None:
            dialer, request_id, _, _ = route
            dialer.pending_offers -= 1
            dialer.send(Refused(request_id, "the target did not answer in time"))

    def _forget(self, peer: _RelayPeer) -> None:
        if peer.public_key is not None and self._registered.get(peer.public_key) is peer:
            del self._registered[peer.public_key]
        for relay_id, (dialer, _, _, expiry) in list(self._routes.items()):
            if dialer is peer:
                expiry.cancel()
                del self._routes[relay_id]
