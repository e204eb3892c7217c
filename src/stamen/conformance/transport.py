"""The transport contract as a reusable suite: every `Transport` must pass every case.

Describe the transport once with a `TransportUnderTest`, then either run everything with
`await run_suite(tut)` or give pytest one test per case:

    @pytest.mark.parametrize("case", CASES)
    async def test_conformance(case: str) -> None:
        await CASES[case](my_transport_under_test())

Each case builds fresh transports, checks behaviour the layers above rely on (ordering,
multi-frame messages of 0 B to `big_message_bytes`, 100 concurrent streams, backpressure,
close/reset, more streams than `max_streams` one after another, dead peers, identity and
swarm-key checks, unreachable addresses) and closes everything it opened. Cases raise `AssertionError` (or the unexpected transport error) on
failure and are bounded by `case_timeout_s`.

The suite knows only `stamen.transports.base`; how to kill a link or find a closed port
is the transport's business, passed in as callables.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from stamen.transports.base import (
    ConnectError,
    Connection,
    ConnectionClosed,
    Credentials,
    HandshakeError,
    IdentityMismatch,
    Limits,
    MessageTooLarge,
    Stream,
    StreamClosed,
    Transport,
    TransportError,
)

MiB = 1024 * 1024


@dataclass(frozen=True)
class TransportUnderTest:
    """How the suite builds, and breaks, one transport."""

    name: str
    make_transport: Callable[[Credentials], Transport]
    listen_address: str
    closed_address: Callable[[], Awaitable[str]]
    """An address where nothing listens (e.g. a port that was just closed)."""
    kill: Callable[[Connection], Awaitable[None] | None] | None = None
    """Abort the link under `Connection` abruptly, without a goodbye to the peer."""
    silence: Callable[[Connection], Awaitable[None] | None] | None = None
    """Make this side stop answering (no reads, no keepalives) while the link stays up."""
    big_message_bytes: int = 64 * MiB
    max_buffered_bytes: int = 32 * MiB
    """How much a sender may push into a stream whose reader is stalled before blocking."""
    dead_peer_timeout_s: float = 5.0
    case_timeout_s: float = 60.0
    sequential_streams: int = Limits().max_streams + 16
    """How many streams `sequential_streams_are_forgotten` opens one after another for each
    way of ending them: more than the transport's `max_streams`, so a leak fails the case."""


@dataclass
class Pair:
    client: Connection
    server: Connection
    client_transport: Transport
    server_transport: Transport
    address: str


@asynccontextmanager
async def connected_pair(
    tut: TransportUnderTest,
    server_credentials: Credentials | None = None,
    client_credentials: Credentials | None = None,
) -> AsyncIterator[Pair]:
    """A listener plus one connection to it; the server end stays open until exit."""
    server_transport = tut.make_transport(server_credentials or Credentials.generate())
    client_transport = tut.make_transport(client_credentials or Credentials.generate())
    accepted: asyncio.Queue[Connection] = asyncio.Queue()
    release = asyncio.Event()

    async def handler(connection: Connection) -> None:
        await accepted.put(connection)
        await release.wait()

    try:
        listener = await server_transport.listen(tut.listen_address, handler)
        address = listener.addresses[0]
        client = await client_transport.connect(address, timeout_s=10.0)
        async with asyncio.timeout(10.0):
            server = await accepted.get()
        try:
            yield Pair(client, server, client_transport, server_transport, address)
        finally:
            release.set()
            await client.close()
            await listener.close()
    finally:
        await client_transport.aclose()
        await server_transport.aclose()


async def _maybe_await(result: Awaitable[None] | None) -> None:
    if result is not None:
        await result


async def _echo_all(stream: Stream) -> None:
    """Echo messages until the peer closes, then close."""
    while True:
        try:
            frames = await stream.recv()
        except StreamClosed:
            break
        await stream.send(frames)
    await stream.close()


def _payload(size: int, seed: int = 0) -> bytes:
    pattern = hashlib.sha256(seed.to_bytes(8, "big")).digest()
    return (pattern * (size // len(pattern) + 1))[:size]


# --- cases -----------------------------------------------------------------------------


async def ordering_and_frame_shapes(tut: TransportUnderTest) -> None:
    """Messages arrive in order and exactly as sent: 1 B, empty frames, many frames,
    mutable buffers, and sizes across frame-chunking boundaries."""
    shapes: list[list[bytes]] = [
        [b"x"],
        [b""],
        [b"", b"", b""],
        [b"head", b"", _payload(70_000, 1), b"tail"],
        [_payload(size, size) for size in (1, 255, 65_536, 65_537, 1 * MiB + 3)],
        [bytes(range(256))] * 64,
    ]
    shapes += [[str(i).encode()] for i in range(200)]
    async with connected_pair(tut) as pair:
        stream = await pair.client.open_stream()
        echo = asyncio.create_task(_echo_all(await pair.server.accept_stream()))
        for frames in shapes:
            await stream.send([bytearray(frame) for frame in frames])
        for frames in shapes:
            received = await stream.recv()
            assert [bytes(frame) for frame in received] == frames, "message changed in transit"
        await stream.close()
        await echo


async def big_message(tut: TransportUnderTest) -> None:
    """One message of `big_message_bytes` (split over several frames) arrives intact."""
    size = tut.big_message_bytes
    frames = [_payload(size // 4 + i, i) for i in range(3)]
    frames.append(_payload(size - sum(map(len, frames)), 9))
    digest = hashlib.sha256(b"".join(frames)).digest()
    async with connected_pair(tut) as pair:
        stream = await pair.client.open_stream()
        sending = asyncio.create_task(stream.send(frames))
        incoming = await pair.server.accept_stream()
        received = await incoming.recv()
        await sending
        assert [len(frame) for frame in received] == [len(frame) for frame in frames]
        hasher = hashlib.sha256()
        for frame in received:
            hasher.update(frame)
        assert hasher.digest() == digest, "big message corrupted"


async def concurrent_streams(tut: TransportUnderTest, stream_count: int = 100) -> None:
    """100 streams in flight at once each see only their own messages, in order."""
    async with connected_pair(tut) as pair:

        async def serve() -> None:
            async with asyncio.TaskGroup() as group:
                for _ in range(stream_count):
                    group.create_task(_echo_all(await pair.server.accept_stream()))

        async def talk(index: int) -> None:
            stream = await pair.client.open_stream()
            for round_ in range(5):
                message = [f"{index}:{round_}".encode(), _payload(1000 * index, index)]
                await stream.send(message)
                assert await stream.recv() == message
            await stream.close()

        async with asyncio.TaskGroup() as group:
            group.create_task(serve())
            for index in range(stream_count):
                group.create_task(talk(index))


async def _stalled_bytes(sent: list[int], settle_s: float = 0.3, limit_s: float = 20.0) -> int:
    """Wait until the sender stops making progress; return what it managed to send."""
    async with asyncio.timeout(limit_s):
        while True:
            before = sent[0]
            await asyncio.sleep(settle_s)
            if sent[0] == before:
                return before


async def slow_reader_backpressure(tut: TransportUnderTest) -> None:
    """A reader that does not read makes `send` block (bounded memory) without blocking
    other streams of the connection; reading again lets the sender finish."""
    message_bytes = 1 * MiB
    total_messages = (tut.max_buffered_bytes // message_bytes) * 2 + 8
    async with connected_pair(tut) as pair:
        slow = await pair.client.open_stream()
        sent = [0]

        async def flood() -> None:
            chunk = _payload(message_bytes)
            for _ in range(total_messages):
                await slow.send([chunk])
                sent[0] += message_bytes

        flooding = asyncio.create_task(flood())
        stalled_reader = await pair.server.accept_stream()
        stuck_at = await _stalled_bytes(sent)
        assert not flooding.done(), "send never blocked on a reader that does not read"
        assert stuck_at <= tut.max_buffered_bytes + message_bytes, (
            f"{stuck_at} bytes accepted for a stalled reader (limit {tut.max_buffered_bytes})"
        )
        # Another stream of the same connection is unaffected.
        other = await pair.client.open_stream()
        echo = asyncio.create_task(_echo_all(await pair.server.accept_stream()))
        await other.send([b"still alive"])
        async with asyncio.timeout(5.0):
            assert await other.recv() == [b"still alive"]
        await other.close()
        await echo
        for _ in range(total_messages):
            assert len((await stalled_reader.recv())[0]) == message_bytes
        await flooding


async def close_semantics(tut: TransportUnderTest) -> None:
    """After `close`, the peer gets every message sent before it, then `StreamClosed`;
    neither side can use the stream afterwards."""
    async with connected_pair(tut) as pair:
        stream = await pair.client.open_stream()
        for index in range(3):
            await stream.send([bytes([index]) * 10])
        await stream.close()
        with _raises(StreamClosed):
            await stream.send([b"late"])
        with _raises(StreamClosed):
            await stream.recv()
        incoming = await pair.server.accept_stream()
        for index in range(3):
            assert await incoming.recv() == [bytes([index]) * 10]
        with _raises(StreamClosed):
            await incoming.recv()
        with _raises(StreamClosed):
            await incoming.send([b"to a closed stream"])
        await incoming.close()  # closing twice (both ends) is harmless
        await stream.close()
        # The connection itself still works.
        fresh = await pair.client.open_stream()
        echo = asyncio.create_task(_echo_all(await pair.server.accept_stream()))
        await fresh.send([b"ok"])
        assert await fresh.recv() == [b"ok"]
        await fresh.close()
        await echo


STREAM_ENDINGS = ("acceptor_closes_first", "opener_closes_first", "read_to_end", "reset")
"""How the layers above end a stream: a unary call the acceptor closes first, a one-way
message the opener closes first, an acceptor that reads up to `StreamClosed` and never
calls `close` (an RPC handler may end that way), a reset."""


async def sequential_streams_are_forgotten(
    tut: TransportUnderTest, patterns: tuple[str, ...] = STREAM_ENDINGS
) -> None:
    """Streams opened one after another on one connection, more than `max_streams` for
    each way of ending them in `patterns`: every ended stream frees its slot on both
    sides, so a connection serving unary calls never runs out of streams."""
    async with connected_pair(tut) as pair:
        delivered: asyncio.Queue[list[bytes]] = asyncio.Queue()

        async def serve() -> None:
            for pattern in patterns:
                for _ in range(tut.sequential_streams):
                    stream = await pair.server.accept_stream()
                    request = await stream.recv()
                    if pattern == "acceptor_closes_first":
                        await stream.send(request)
                        await stream.close()
                        continue
                    if pattern == "reset":
                        await stream.send(request)
                    with _raises(StreamClosed):
                        await stream.recv()
                    if pattern == "opener_closes_first":
                        await stream.close()
                    await delivered.put(request)

        async def call(pattern: str, message: list[bytes]) -> None:
            stream = await pair.client.open_stream()
            await stream.send(message)
            if pattern == "acceptor_closes_first":
                assert await stream.recv() == message
                with _raises(StreamClosed):
                    await stream.recv()
                await stream.close()
                return
            if pattern == "reset":
                assert await stream.recv() == message
                stream.reset()
            else:
                await stream.close()
            assert await delivered.get() == message

        serving = asyncio.create_task(serve())
        try:
            for pattern in patterns:
                for index in range(tut.sequential_streams):
                    await call(pattern, [index.to_bytes(4, "big"), pattern.encode()])
            await serving
        finally:
            serving.cancel()


async def reset_semantics(tut: TransportUnderTest) -> None:
    """`reset` aborts one stream on both sides (waking a blocked sender and a waiting
    reader) and leaves the other streams of the connection working."""
    async with connected_pair(tut) as pair:
        doomed = await pair.client.open_stream()
        survivor = await pair.client.open_stream()
        await doomed.send([b"hello"])
        await survivor.send([b"hello"])
        server_doomed = await pair.server.accept_stream()
        server_survivor = await pair.server.accept_stream()
        if server_doomed.stream_id != doomed.stream_id:
            server_doomed, server_survivor = server_survivor, server_doomed
        assert await server_doomed.recv() == [b"hello"]

        waiting_reader = asyncio.create_task(server_doomed.recv())
        blocked_sender = asyncio.create_task(_send_forever(server_doomed))
        await asyncio.sleep(0.2)
        doomed.reset()
        with _raises(StreamClosed):
            await doomed.recv()
        with _raises(StreamClosed):
            await doomed.send([b"after reset"])
        async with asyncio.timeout(tut.dead_peer_timeout_s):
            for task in (waiting_reader, blocked_sender):
                with _raises(StreamClosed):
                    await task

        echo = asyncio.create_task(_echo_all(server_survivor))
        assert await survivor.recv() == [b"hello"]
        await survivor.send([b"again"])
        assert await survivor.recv() == [b"again"]
        await survivor.close()
        await echo


async def _send_forever(stream: Stream) -> None:
    chunk = _payload(MiB)
    while True:
        await stream.send([chunk])


async def both_sides_open_streams(tut: TransportUnderTest) -> None:
    """The accepting side can open streams too, and both sides see the right keys."""
    server_credentials = Credentials.generate()
    client_credentials = Credentials.generate()
    async with connected_pair(tut, server_credentials, client_credentials) as pair:
        assert pair.client.remote_public_key == server_credentials.public_key
        assert pair.server.remote_public_key == client_credentials.public_key
        from_server = await pair.server.open_stream()
        from_client = await pair.client.open_stream()
        await from_server.send([b"from server"])
        await from_client.send([b"from client"])
        assert await (await pair.client.accept_stream()).recv() == [b"from server"]
        assert await (await pair.server.accept_stream()).recv() == [b"from client"]
        assert from_server.stream_id != from_client.stream_id


async def connection_close(tut: TransportUnderTest) -> None:
    """Closing a connection ends every stream on both sides with a transport error."""
    async with connected_pair(tut) as pair:
        stream = await pair.client.open_stream()
        await stream.send([b"x"])
        incoming = await pair.server.accept_stream()
        assert await incoming.recv() == [b"x"]
        pending_accept = asyncio.create_task(pair.server.accept_stream())
        await pair.client.close()
        assert pair.client.is_closed
        async with asyncio.timeout(tut.dead_peer_timeout_s):
            with _raises(TransportError):
                await incoming.recv()
            with _raises(ConnectionClosed):
                await pending_accept
        with _raises(TransportError):
            await stream.send([b"y"])
        with _raises(ConnectionClosed):
            await pair.client.open_stream()


async def dead_peer_detected(tut: TransportUnderTest) -> None:
    """A peer whose link dies without a goodbye is noticed within `dead_peer_timeout_s`."""
    for breaker in (tut.kill, tut.silence):
        if breaker is None:
            continue
        async with connected_pair(tut) as pair:
            stream = await pair.client.open_stream()
            await stream.send([b"x"])
            assert await (await pair.server.accept_stream()).recv() == [b"x"]
            await _maybe_await(breaker(pair.server))
            async with asyncio.timeout(tut.dead_peer_timeout_s):
                with _raises(TransportError):
                    await stream.recv()
            assert pair.client.is_closed


async def identity_mismatch_refused(tut: TransportUnderTest) -> None:
    """A dialer expecting another key is refused; the right key is accepted."""
    async with connected_pair(tut) as pair:
        wrong_key = Credentials.generate().public_key
        with _raises(IdentityMismatch):
            await pair.client_transport.connect(pair.address, expected_public_key=wrong_key)
        right_key = pair.client.remote_public_key
        again = await pair.client_transport.connect(pair.address, expected_public_key=right_key)
        await again.close()


async def swarm_key_refused(tut: TransportUnderTest) -> None:
    """Peers must hold the same swarm key (or both none) to connect."""
    swarm_key = os.urandom(32)
    cases = [(swarm_key, os.urandom(32)), (swarm_key, None), (None, swarm_key)]
    for server_key, client_key in cases:
        server = tut.make_transport(Credentials.generate(swarm_key=server_key))
        client = tut.make_transport(Credentials.generate(swarm_key=client_key))
        try:
            listener = await server.listen(tut.listen_address, _hold_open)
            with _raises(HandshakeError):
                await client.connect(listener.addresses[0], timeout_s=10.0)
            await listener.close()
        finally:
            await client.aclose()
            await server.aclose()
    async with connected_pair(
        tut, Credentials.generate(swarm_key=swarm_key), Credentials.generate(swarm_key=swarm_key)
    ) as pair:
        stream = await pair.client.open_stream()
        await stream.send([b"member"])
        assert await (await pair.server.accept_stream()).recv() == [b"member"]


async def _hold_open(connection: Connection) -> None:
    await asyncio.sleep(3600)


async def closed_address_refused(tut: TransportUnderTest) -> None:
    """Dialing an address where nothing listens fails fast with `ConnectError`."""
    address = await tut.closed_address()
    transport = tut.make_transport(Credentials.generate())
    try:
        async with asyncio.timeout(5.0):
            with _raises(ConnectError):
                await transport.connect(address, timeout_s=5.0)
    finally:
        await transport.aclose()


async def too_many_frames_refused(tut: TransportUnderTest) -> None:
    """A message over the frame limit raises `MessageTooLarge` and the stream stays usable."""
    async with connected_pair(tut) as pair:
        stream = await pair.client.open_stream()
        with _raises(MessageTooLarge):
            await stream.send([b"f"] * 100_000)
        await stream.send([b"fine"])
        assert await (await pair.server.accept_stream()).recv() == [b"fine"]


CASES: dict[str, Callable[[TransportUnderTest], Awaitable[None]]] = {
    case.__name__: case
    for case in (
        ordering_and_frame_shapes,
        big_message,
        concurrent_streams,
        slow_reader_backpressure,
        close_semantics,
        sequential_streams_are_forgotten,
        reset_semantics,
        both_sides_open_streams,
        connection_close,
        dead_peer_detected,
        identity_mismatch_refused,
        swarm_key_refused,
        closed_address_refused,
        too_many_frames_refused,
    )
}


async def run_case(name: str, tut: TransportUnderTest) -> None:
    async with asyncio.timeout(tut.case_timeout_s):
        await CASES[name](tut)


async def run_suite(tut: TransportUnderTest) -> None:
    """Run every case in order; the first failure propagates."""
    for name in CASES:
        await run_case(name, tut)


class _raises:
    """`pytest.raises` without pytest: the suite must be runnable from any harness."""

    def __init__(self, expected: type[BaseException]) -> None:
        self.expected = expected

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> bool:
        if exc_type is None:
            raise AssertionError(f"expected {self.expected.__name__}, nothing was raised")
        return issubclass(exc_type, self.expected)
