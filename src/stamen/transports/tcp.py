"""The tcp transport: asyncio sockets, a Noise handshake, then many flow-controlled
streams over one connection.

Addresses are `tcp://HOST:PORT` (`tcp://[::1]:PORT` for IPv6); port 0 picks a free port,
which `Listener.addresses` reports. Every connection runs the `handshake`
(`Noise_XXpsk3_25519_AESGCM_SHA256`: the swarm key as PSK, each peer's ed25519 identity
bound to its Noise static key) and then carries only AES-256-GCM records: there is no
mode without encryption and integrity. Sockets get TCP_NODELAY; the stream multiplexing,
flow control and keepalives are `mux`'s.

Noise over plain sockets was chosen over TLS: Python's `ssl` cannot verify a self-signed
peer certificate against a raw ed25519 key without a CA, it has no PSK mode for TLS 1.3
that would carry the swarm key, and a Noise handshake is a few hundred lines checked
against published test vectors, with records that run at several GB/s here (see
benchmarks/transport_speed.py).

Errors from sockets and the handshake are translated into `stamen.transports.base`'s tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass

from stamen.transports.base import (
    ConnectError,
    ConnectionClosed,
    ConnectionHandler,
    Credentials,
    HandshakeError,
    Limits,
    Listener,
    Transport,
)
from stamen.transports.handshake import handshake
from stamen.transports.mux import MuxConnection, MuxSettings
from stamen.transports.packets import MIN_WINDOW_BYTES

logger = logging.getLogger(__name__)

SCHEME = "tcp://"
READ_BUFFER_BYTES = 1024 * 1024  # StreamReader limit: fewer pause/resume cycles on big data


@dataclass(frozen=True)
class TcpOptions:
    """Knobs of the tcp transport; the defaults suit a swarm over the internet."""

    limits: Limits = Limits()
    window_bytes: int = 4 * 1024 * 1024
    keepalive_interval_s: float = 1.0
    keepalive_timeout_s: float = 5.0
    handshake_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.window_bytes < MIN_WINDOW_BYTES:
            raise ValueError(f"window_bytes must be at least {MIN_WINDOW_BYTES}")
        if self.limits.max_frames > 4096:
            raise ValueError("max_frames above 4096 would not fit a message header packet")
        if not 0 < self.keepalive_interval_s < self.keepalive_timeout_s:
            raise ValueError("need 0 < keepalive_interval_s < keepalive_timeout_s")


def parse_address(address: str) -> tuple[str, int]:
    """`tcp://host:port` -> (host, port); raises `ConnectError` for anything else."""
    if not address.startswith(SCHEME):
        raise ConnectError(f"not a tcp address: {address!r}")
    host, sep, port = address[len(SCHEME) :].rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConnectError(f"malformed tcp address: {address!r}")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    return f"{SCHEME}[{host}]:{port}" if ":" in host else f"{SCHEME}{host}:{port}"


def _peer_address(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return format_address(peer[0], peer[1]) if peer else f"{SCHEME}unknown:0"


async def _drain_reader(reader: asyncio.StreamReader) -> bytes:
    """What the reader buffered beyond the handshake, without waiting for more."""
    chunks = []
    while True:
        try:
            async with asyncio.timeout(0):
                chunk = await reader.read(READ_BUFFER_BYTES)
        except TimeoutError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


class TcpListener(Listener):
    def __init__(self, transport: TcpTransport, handler: ConnectionHandler) -> None:
        self._transport = transport
        self._handler = handler
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._connections: set[MuxConnection] = set()

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(
            self._on_client, host, port, limit=READ_BUFFER_BYTES
        )

    @property
    def addresses(self) -> list[str]:
        if self._server is None:
            return []
        return [format_address(*sock.getsockname()[:2]) for sock in self._server.sockets]

    def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Our own task rather than asyncio's callback task, so `close` can cancel it
        # without asyncio logging the cancellation as an error.
        task = asyncio.get_running_loop().create_task(self._run_client(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            connection = await self._transport.establish(reader, writer, is_dialer=False)
        except ConnectError as exc:
            logger.info("refused %s: %s", _peer_address(writer), exc)
            writer.close()
            return
        await self._serve(connection)

    async def _serve(self, connection: MuxConnection) -> None:
        self._connections.add(connection)
        try:
            await self._handler(connection)
        except Exception:
            logger.exception("connection handler for %s failed", connection.remote_address)
        finally:
            self._connections.discard(connection)
            await connection.close()

    async def close(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for connection in list(self._connections):
            connection.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await server.wait_closed()


class TcpTransport(Transport):
    """See the module docstring."""

    name = "tcp"

    def __init__(self, credentials: Credentials, options: TcpOptions | None = None) -> None:
        self.credentials = credentials
        self.options = options if options is not None else TcpOptions()
        self._listeners: list[TcpListener] = []
        self._connections: set[MuxConnection] = set()

    async def listen(self, address: str, handler: ConnectionHandler) -> TcpListener:
        host, port = parse_address(address)
        listener = TcpListener(self, handler)
        try:
            await listener.start(host, port)
        except OSError as exc:
            raise ConnectError(f"cannot listen on {address}: {exc}") from exc
        self._listeners.append(listener)
        return listener

    async def connect(
        self,
        address: str,
        *,
        expected_public_key: bytes | None = None,
        timeout_s: float = 10.0,
    ) -> MuxConnection:
        host, port = parse_address(address)
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_connection(host, port, limit=READ_BUFFER_BYTES)
        except (OSError, TimeoutError) as exc:
            raise ConnectError(f"cannot reach {address}: {exc}") from exc
        connection = await self.establish(
            reader,
            writer,
            is_dialer=True,
            expected_public_key=expected_public_key,
            timeout_s=timeout_s,
            remote_address=address,
        )
        self._connections = {known for known in self._connections if not known.is_closed}
        self._connections.add(connection)
        return connection

    async def establish(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        is_dialer: bool,
        expected_public_key: bytes | None = None,
        timeout_s: float | None = None,
        remote_address: str | None = None,
    ) -> MuxConnection:
        """Handshake on a connected socket and wrap it; closes the socket on failure."""
        options = self.options
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            async with asyncio.timeout(timeout_s or options.handshake_timeout_s):
                result = await handshake(
                    reader,
                    writer,
                    credentials=self.credentials,
                    is_dialer=is_dialer,
                    limits=options.limits,
                    window_bytes=options.window_bytes,
                    expected_public_key=expected_public_key,
                )
        except TimeoutError as exc:
            writer.close()
            raise HandshakeError("handshake timed out") from exc
        except BaseException:
            # ConnectError, and also cancellation (a listener closing mid-handshake, a
            # caller giving up): the socket must not wait for the garbage collector.
            writer.close()
            raise
        settings = MuxSettings(
            limits=options.limits,
            window_bytes=options.window_bytes,
            keepalive_interval_s=options.keepalive_interval_s,
            keepalive_timeout_s=options.keepalive_timeout_s,
        )
        transport = writer.transport
        assert isinstance(transport, asyncio.Transport)  # what asyncio.open_connection makes
        # Packets the peer sent right after its handshake may already sit in the reader.
        # The socket is not read meanwhile, so that nothing can overtake them.
        transport.pause_reading()
        leftover = await _drain_reader(reader)
        connection = MuxConnection(
            transport,
            settings=settings,
            remote_public_key=result.remote.public_key,
            remote_address=remote_address or _peer_address(writer),
            remote_limits=result.remote.limits,
            remote_window_bytes=result.remote.window_bytes,
            is_dialer=is_dialer,
            send_cipher=result.send_cipher,
            recv_cipher=result.recv_cipher,
            keep_alive=(writer,),
        )
        if leftover:
            connection.feed(leftover)
        if reader.at_eof():
            connection.lost(ConnectionClosed("the peer closed the connection"))
        elif not transport.is_closing():
            transport.resume_reading()
        return connection

    async def aclose(self) -> None:
        for listener in self._listeners:
            await listener.close()
        for connection in list(self._connections):
            await connection.close()
        self._listeners.clear()
        self._connections.clear()
