"""The transport seam: move ordered, reliable, multi-frame messages between two peers.

A `Transport` dials (`connect`) or accepts (`listen`) peers. A `Connection` to one peer
carries many independent `Stream`s (one per inference session, say); each stream is an
ordered, reliable sequence of messages, and each message is a list of byte frames that
arrives exactly as it was sent. `Stream.send` waits while the peer is slow (backpressure);
nothing queues without bound.

Peers authenticate with ed25519 keys: the transport proves the local key during its
handshake and reports the remote public key (`Connection.remote_public_key`); a dialer that
passes `expected_public_key` gets `IdentityMismatch` instead of a connection to an impostor.
An optional swarm key (shared secret) makes peers without it fail the handshake. Deriving
peer ids from keys, versions and message schemas belong to the layer above.

This package knows nothing about tensors or models.

Errors (every library exception is translated into this tree at the boundary):

    TransportError
    ├── ConnectError           could not reach or handshake with the peer
    │   ├── HandshakeError     the peer spoke, but the handshake failed (wrong swarm key…)
    │   └── IdentityMismatch   the peer's key is not the one expected
    ├── ConnectionClosed       the connection is gone (closed, reset, peer dead)
    ├── StreamClosed           this stream was closed or reset by either side
    └── MessageTooLarge        a message or frame exceeds the configured limits
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

Frames = Sequence[bytes | bytearray | memoryview]


class TransportError(Exception):
    """Base of all transport errors."""


class ConnectError(TransportError):
    """The peer could not be reached, or the handshake failed."""


class HandshakeError(ConnectError):
    """The peer answered but the handshake failed (bad swarm key, garbage, timeout)."""


class IdentityMismatch(ConnectError):
    """The peer authenticated with a different key than the caller expected."""


class ConnectionClosed(TransportError):
    """The connection was closed, reset, or the peer stopped answering."""


class StreamClosed(TransportError):
    """The stream was closed or reset (by either side)."""


class MessageTooLarge(TransportError):
    """A message exceeds `Limits`."""


@dataclass(frozen=True)
class Limits:
    """Hard caps applied to every received message before anything is allocated."""

    max_frames: int = 64
    max_message_bytes: int = 256 * 1024 * 1024
    max_streams: int = 1024


@dataclass(frozen=True)
class Credentials:
    """The local peer's key and, for a private swarm, the shared swarm key."""

    private_key: Ed25519PrivateKey
    swarm_key: bytes | None = None

    @classmethod
    def generate(cls, swarm_key: bytes | None = None) -> Credentials:
        return cls(Ed25519PrivateKey.generate(), swarm_key)

    @property
    def public_key(self) -> bytes:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        return self.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


class Stream(ABC):
    """One ordered, reliable message stream inside a `Connection`."""

    @property
    @abstractmethod
    def stream_id(self) -> int: ...

    @abstractmethod
    async def send(self, frames: Frames) -> None:
        """Send one message; waits while the peer is not reading (backpressure).
        Raises `StreamClosed`, `ConnectionClosed` or `MessageTooLarge`."""

    @abstractmethod
    async def recv(self) -> list[bytes]:
        """The next message. Raises `StreamClosed` once the peer closed or reset the stream
        and every message sent before that was received."""

    @abstractmethod
    async def close(self) -> None:
        """Graceful close: the peer receives what was sent, then `StreamClosed`."""

    @abstractmethod
    def reset(self) -> None:
        """Abort now (cancellation): pending messages may be dropped, both sides see
        `StreamClosed`. Other streams of the connection are not affected."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.close()
        else:
            self.reset()


class Connection(ABC):
    """An authenticated link to one peer, carrying many streams."""

    @property
    @abstractmethod
    def remote_public_key(self) -> bytes:
        """The peer's raw 32-byte ed25519 public key, proven in the handshake."""

    @property
    @abstractmethod
    def remote_address(self) -> str: ...

    @property
    @abstractmethod
    def is_closed(self) -> bool: ...

    @abstractmethod
    async def open_stream(self) -> Stream: ...

    @abstractmethod
    async def accept_stream(self) -> Stream:
        """Wait for the peer to open a stream. Raises `ConnectionClosed`."""

    @abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


ConnectionHandler = Callable[[Connection], Awaitable[None]]


class Listener(ABC):
    """A bound listening endpoint; `addresses` are what peers dial."""

    @property
    @abstractmethod
    def addresses(self) -> list[str]: ...

    @abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class Transport(ABC):
    """Dials and accepts authenticated connections. `name` is its scheme (`tcp`, ...)."""

    name: str

    @abstractmethod
    async def connect(
        self,
        address: str,
        *,
        expected_public_key: bytes | None = None,
        timeout_s: float = 10.0,
    ) -> Connection: ...

    @abstractmethod
    async def listen(self, address: str, handler: ConnectionHandler) -> Listener:
        """Accept connections on `address`; `handler` runs once per accepted connection
        (as its own task; the connection is closed when it returns)."""

    async def aclose(self) -> None:
        """Release transport-wide resources (sockets, peer connections), if any."""
        return None
