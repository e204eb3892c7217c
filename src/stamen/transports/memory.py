"""In-process transport for tests: listeners live in a `MemoryHub`, messages never leave
the event loop.

It honours the whole `base` contract so the layers above can be tested without sockets:
bounded per-stream buffers (`send` waits while the peer's unread bytes exceed
`window_bytes`), graceful close and reset per stream, connection close, the peer's
`Limits`, the identity check (`expected_public_key`) and the swarm-key check. Nothing is
encrypted or serialized; frames are copied only when the caller passed a mutable buffer.

Addresses are `memory://NAME`; `memory://` (or `memory://0`) picks a fresh name, which
`Listener.addresses` reports. One hub is shared per process by default; pass your own
`MemoryHub` to isolate tests from each other.

It does not know about sockets, keepalives or peers dying silently: a closed connection
is seen by its peer at once.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
from collections import deque
from collections.abc import Callable

from stamen.transports.base import (
    ConnectError,
    Connection,
    ConnectionClosed,
    ConnectionHandler,
    Credentials,
    Frames,
    HandshakeError,
    IdentityMismatch,
    Limits,
    Listener,
    Stream,
    StreamClosed,
    Transport,
)
from stamen.transports.flow import Signal, check_message

logger = logging.getLogger(__name__)

SCHEME = "memory://"
DEFAULT_WINDOW_BYTES = 4 * 1024 * 1024


class MemoryStream(Stream):
    """One end of an in-process stream; `_peer` is the other end."""

    def __init__(self, connection: MemoryConnection, stream_id: int) -> None:
        self._connection = connection
        self._id = stream_id
        self._peer: MemoryStream | None = None
        self._inbox: deque[tuple[list[bytes], int]] = deque()
        self.inbox_bytes = 0
        self.local_closed = False  # we closed or reset: no more sends, no more receives
        self.remote_closed = False  # peer closed gracefully: drain the inbox, then closed
        self.was_reset = False
        self.changed = Signal()

    @property
    def stream_id(self) -> int:
        return self._id

    def _raise_if_unusable(self) -> None:
        if self.was_reset or self.local_closed:
            raise StreamClosed(f"stream {self._id} is closed")
        if self._connection.is_closed:
            raise ConnectionClosed("connection closed")

    async def send(self, frames: Frames) -> None:
        peer = self._peer
        assert peer is not None  # wired by MemoryConnection before the stream is handed out
        self._raise_if_unusable()
        views = check_message(frames, self._connection.remote_limits)
        size = sum(len(view) for view in views)
        window_bytes = self._connection.window_bytes
        # A message bigger than the window still goes through once the peer's inbox is empty.
        while peer.inbox_bytes and peer.inbox_bytes + size > window_bytes:
            self._raise_if_unusable()
            if peer.local_closed or peer.was_reset:
                raise StreamClosed(f"stream {self._id} was closed by the peer")
            await peer.changed.wait()
        self._raise_if_unusable()
        if peer.local_closed or peer.was_reset:
            raise StreamClosed(f"stream {self._id} was closed by the peer")
        # bytes(b) is b itself for bytes; mutable buffers are copied because the caller
        # may reuse them as soon as send returns.
        peer._inbox.append(([bytes(frame) for frame in frames], size))
        peer.inbox_bytes += size
        peer.changed.fire()

    async def recv(self) -> list[bytes]:
        while True:
            if self.was_reset or self.local_closed:
                raise StreamClosed(f"stream {self._id} is closed")
            if self._inbox:
                frames, size = self._inbox.popleft()
                self.inbox_bytes -= size
                self.changed.fire()  # a sender may be waiting for room
                return frames
            if self.remote_closed:
                # Everything the peer sent was read: the stream is over for both ends.
                self._end_gracefully()
                raise StreamClosed(f"stream {self._id} was closed by the peer")
            if self._connection.is_closed:
                raise ConnectionClosed("connection closed")
            await self.changed.wait()

    async def close(self) -> None:
        self._end_gracefully()

    def _end_gracefully(self) -> None:
        if self.local_closed or self.was_reset:
            return
        self._finish()
        self._connection.forget_if_done(self)
        peer = self._peer
        if peer is not None:
            peer.remote_closed = True
            peer.changed.fire()
            # When the peer closed first, this close ends the stream for both ends: the
            # peer's end must be forgotten too, or it counts against `max_streams` forever.
            peer._connection.forget_if_done(peer)

    def reset(self) -> None:
        for end in (self, self._peer):
            if end is not None and not end.was_reset:
                end.was_reset = True
                end._finish()
                end._connection.forget_if_done(end)

    def _finish(self) -> None:
        self.local_closed = True
        self._inbox.clear()
        self.inbox_bytes = 0
        self.changed.fire()

    @property
    def is_done(self) -> bool:
        """Both directions are over; the stream no longer counts against `max_streams`."""
        return self.was_reset or (self.local_closed and self.remote_closed)


class MemoryConnection(Connection):
    """One side of an in-process connection."""

    def __init__(
        self,
        *,
        local_key: bytes,
        remote_key: bytes,
        remote_address: str,
        limits: Limits,
        remote_limits: Limits,
        window_bytes: int,
        is_dialer: bool,
    ) -> None:
        self._local_key = local_key
        self._remote_key = remote_key
        self._remote_address = remote_address
        self.limits = limits
        self.remote_limits = remote_limits
        self.window_bytes = window_bytes
        self._peer: MemoryConnection | None = None
        self._streams: dict[int, MemoryStream] = {}
        self._incoming: deque[MemoryStream] = deque()
        # Dialers use odd ids, acceptors even ones, so both can open streams without a race.
        self.is_dialer = is_dialer
        self._ids = itertools.count(1 if is_dialer else 2, 2)
        self._closed = False
        self.changed = Signal()
        # Called once on close, so that whoever tracks open connections lets go of this one
        # (and of every frame its streams still hold).
        self.on_close: Callable[[MemoryConnection], None] | None = None

    @property
    def remote_public_key(self) -> bytes:
        return self._remote_key

    @property
    def remote_address(self) -> str:
        return self._remote_address

    @property
    def is_closed(self) -> bool:
        return self._closed

    def _inbound_count(self) -> int:
        own_parity = 1 if self.is_dialer else 0
        return sum(1 for stream_id in self._streams if stream_id % 2 != own_parity)

    async def open_stream(self) -> MemoryStream:
        peer = self._peer
        if self._closed or peer is None:
            raise ConnectionClosed("connection closed")
        if peer._inbound_count() >= peer.limits.max_streams:
            raise StreamClosed(f"the peer's stream limit ({peer.limits.max_streams}) is reached")
        stream_id = next(self._ids)
        local, remote = MemoryStream(self, stream_id), MemoryStream(peer, stream_id)
        local._peer, remote._peer = remote, local
        self._streams[stream_id] = local
        peer._streams[stream_id] = remote
        peer._incoming.append(remote)
        peer.changed.fire()
        return local

    async def accept_stream(self) -> MemoryStream:
        while True:
            if self._incoming:
                return self._incoming.popleft()
            if self._closed:
                raise ConnectionClosed("connection closed")
            await self.changed.wait()

    def forget_if_done(self, stream: MemoryStream) -> None:
        if stream.is_done:
            self._streams.pop(stream.stream_id, None)

    async def close(self) -> None:
        for end in (self, self._peer):
            if end is not None and not end._closed:
                end._closed = True
                end._incoming.clear()
                end.changed.fire()
                for stream in list(end._streams.values()):
                    stream.changed.fire()
                if end.on_close is not None:
                    end.on_close(end)


class MemoryHub:
    """Where in-process listeners are registered by name."""

    def __init__(self) -> None:
        self.listeners: dict[str, MemoryListener] = {}
        self._names = itertools.count(1)

    def fresh_address(self) -> str:
        return f"{SCHEME}auto-{next(self._names)}"


DEFAULT_HUB = MemoryHub()


class MemoryListener(Listener):
    def __init__(
        self, transport: MemoryTransport, address: str, handler: ConnectionHandler
    ) -> None:
        self.transport = transport
        self._address = address
        self._handler = handler
        self._tasks: set[asyncio.Task[None]] = set()
        self._connections: set[MemoryConnection] = set()
        self.closed = False

    @property
    def addresses(self) -> list[str]:
        return [self._address]

    def accept(self, connection: MemoryConnection) -> None:
        self._connections.add(connection)
        task = asyncio.get_running_loop().create_task(self._serve(connection))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, connection: MemoryConnection) -> None:
        try:
            await self._handler(connection)
        except Exception:
            logger.exception("connection handler for %s failed", self._address)
        finally:
            self._connections.discard(connection)
            await connection.close()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        hub = self.transport.hub
        if hub.listeners.get(self._address) is self:
            del hub.listeners[self._address]
        for connection in list(self._connections):
            await connection.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class MemoryTransport(Transport):
    """In-process transport; see the module docstring."""

    name = "memory"

    def __init__(
        self,
        credentials: Credentials,
        *,
        hub: MemoryHub | None = None,
        limits: Limits | None = None,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
    ) -> None:
        self.credentials = credentials
        self.hub = hub if hub is not None else DEFAULT_HUB
        self.limits = limits if limits is not None else Limits()
        self.window_bytes = window_bytes
        self._listeners: list[MemoryListener] = []
        self._connections: set[MemoryConnection] = set()

    async def listen(self, address: str, handler: ConnectionHandler) -> MemoryListener:
        name = _parse_address(address)
        if name in ("", "0"):
            address = self.hub.fresh_address()
        elif address in self.hub.listeners:
            raise ConnectError(f"{address} is already in use")
        listener = MemoryListener(self, address, handler)
        self.hub.listeners[address] = listener
        self._listeners.append(listener)
        return listener

    async def connect(
        self,
        address: str,
        *,
        expected_public_key: bytes | None = None,
        timeout_s: float = 10.0,
    ) -> MemoryConnection:
        _parse_address(address)
        listener = self.hub.listeners.get(address)
        if listener is None or listener.closed:
            raise ConnectError(f"nothing listens on {address}")
        server = listener.transport
        if not _same_swarm_key(self.credentials.swarm_key, server.credentials.swarm_key):
            logger.info("refused a connection to %s: swarm keys differ", address)
            raise HandshakeError(f"{address} refused the handshake (swarm key)")
        server_key = server.credentials.public_key
        if expected_public_key is not None and server_key != expected_public_key:
            raise IdentityMismatch(f"{address} authenticated with another key")
        client_end = MemoryConnection(
            local_key=self.credentials.public_key,
            remote_key=server_key,
            remote_address=address,
            limits=self.limits,
            remote_limits=server.limits,
            window_bytes=server.window_bytes,
            is_dialer=True,
        )
        server_end = MemoryConnection(
            local_key=server_key,
            remote_key=self.credentials.public_key,
            remote_address=f"{SCHEME}client-of-{address[len(SCHEME) :]}",
            limits=server.limits,
            remote_limits=self.limits,
            window_bytes=self.window_bytes,
            is_dialer=False,
        )
        client_end._peer, server_end._peer = server_end, client_end
        client_end.on_close = self._connections.discard
        self._connections.add(client_end)
        listener.accept(server_end)
        return client_end

    async def aclose(self) -> None:
        for listener in self._listeners:
            await listener.close()
        for connection in list(self._connections):
            await connection.close()
        self._listeners.clear()
        self._connections.clear()


def _parse_address(address: str) -> str:
    if not address.startswith(SCHEME):
        raise ConnectError(f"not a memory address: {address!r}")
    return address[len(SCHEME) :]


def _same_swarm_key(a: bytes | None, b: bytes | None) -> bool:
    if a is None or b is None:
        return a is b
    return hmac.compare_digest(a, b)
