"""Hostile bytes at a tcp listener: garbage handshakes, and malformed, truncated and
oversized packets after a real handshake. Each offender is disconnected, nothing absurd is
allocated, and the listener keeps serving a well-behaved client throughout."""

from __future__ import annotations

import asyncio
import os
import struct
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stamen.transports.base import Connection, Credentials, Limits, TransportError
from stamen.transports.handshake import RECORD_PREFIX, handshake
from stamen.transports.packets import (
    ALL_KINDS,
    FLAG_SYN,
    FRAME_BYTES,
    FRAME_COUNT,
    PACKET,
    WINDOW,
    Kind,
)
from stamen.transports.tcp import TcpOptions, TcpTransport, parse_address

U64_MAX = 2**64 - 1
LIMITS = Limits(max_frames=8, max_message_bytes=1024 * 1024, max_streams=16)
DISCONNECT_TIMEOUT_S = 5.0


async def echo_handler(connection: Connection) -> None:
    async def echo(stream) -> None:  # type: ignore[no-untyped-def]
        try:
            while True:
                await stream.send(await stream.recv())
        except TransportError:
            stream.reset()

    tasks = set()
    try:
        while True:
            task = asyncio.create_task(echo(await connection.accept_stream()))
            tasks.add(task)
    except TransportError:
        pass
    finally:
        for task in tasks:
            task.cancel()


@dataclass
class Target:
    transport: TcpTransport
    host: str
    port: int
    address: str
    encrypt: bool


async def _start_target(encrypt: bool) -> Target:
    options = TcpOptions(encrypt=encrypt, limits=LIMITS, handshake_timeout_s=0.5)
    transport = TcpTransport(Credentials.generate(), options)
    listener = await transport.listen("tcp://127.0.0.1:0", echo_handler)
    host, port = parse_address(listener.addresses[0])
    return Target(transport, host, port, listener.addresses[0], encrypt)


@pytest.fixture(params=[False, True], ids=["plaintext", "encrypted"])
async def target(request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    started = await _start_target(request.param)
    yield started
    await started.transport.aclose()


@pytest.fixture
async def plaintext_target() -> AsyncIterator[Target]:
    started = await _start_target(encrypt=False)
    yield started
    await started.transport.aclose()


@pytest.fixture
async def encrypted_target() -> AsyncIterator[Target]:
    started = await _start_target(encrypt=True)
    yield started
    await started.transport.aclose()


async def _handshaken(target: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw socket that completed a real handshake (plaintext packets follow)."""
    reader, writer = await asyncio.open_connection(target.host, target.port)
    await handshake(
        reader,
        writer,
        credentials=Credentials.generate(),
        is_dialer=True,
        encrypt=False,
        limits=LIMITS,
        window_bytes=1024 * 1024,
    )
    return reader, writer


async def _assert_disconnected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The server hangs up on us: EOF (or a reset) within the timeout."""
    try:
        async with asyncio.timeout(DISCONNECT_TIMEOUT_S):
            while await reader.read(65536):
                pass
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _assert_serving(target: Target, good: Connection) -> None:
    """An established client and a new one still get echoes."""
    stream = await good.open_stream()
    await stream.send([b"still", b"here"])
    assert await stream.recv() == [b"still", b"here"]
    await stream.close()
    client = TcpTransport(Credentials.generate(), TcpOptions(encrypt=target.encrypt))
    try:
        fresh = await client.connect(target.address)
        stream = await fresh.open_stream()
        await stream.send([b"new"])
        assert await stream.recv() == [b"new"]
    finally:
        await client.aclose()


def packet(kind: int, stream_id: int, payload: bytes = b"", flags: int = 0, length: int = -1):
    declared = len(payload) if length < 0 else length
    return PACKET.pack(kind, flags, 0, stream_id, declared) + payload


def msg_header(*sizes: int, count: int | None = None) -> bytes:
    frame_count = len(sizes) if count is None else count
    return FRAME_COUNT.pack(frame_count) + b"".join(FRAME_BYTES.pack(size) for size in sizes)


MALFORMED_PACKETS = {
    "u64 max length": packet(Kind.MSG, 1, flags=FLAG_SYN, length=U64_MAX),
    "length just over the limit": packet(Kind.DATA, 1, flags=FLAG_SYN, length=2**20),
    "u32 max frame count": packet(Kind.MSG, 1, msg_header(count=2**32 - 1), FLAG_SYN),
    "too many frames": packet(Kind.MSG, 1, msg_header(*[1] * 9), FLAG_SYN),
    "u64 max frame size": packet(Kind.MSG, 1, msg_header(U64_MAX), FLAG_SYN),
    "frame sizes over the message limit": packet(
        Kind.MSG, 1, msg_header(2**19, 2**19 + 1), FLAG_SYN
    ),
    "truncated message header": packet(Kind.MSG, 1, b"\x00\x00", FLAG_SYN),
    "data beyond the declared size": packet(Kind.MSG, 1, msg_header(1) + b"xy", FLAG_SYN),
    "data for a never-opened stream": packet(Kind.DATA, 77, b"x"),
    "stream id of the wrong parity": packet(Kind.MSG, 2, msg_header(1) + b"x", FLAG_SYN),
    "stream 0": packet(Kind.MSG, 0, msg_header(1) + b"x", FLAG_SYN),
    "unknown packet type": packet(200, 0),
    "unknown flags": packet(Kind.PING, 0, bytes(8), flags=0x80),
    "reserved bits set": PACKET.pack(Kind.PING, 0, 1, 0, 8) + bytes(8),
    "window overflow": packet(Kind.WINDOW, 1, WINDOW.pack(U64_MAX), FLAG_SYN),
    "malformed ping": packet(Kind.PING, 0, b"\x01"),
    "data outside a message": packet(Kind.DATA, 1, b"x", FLAG_SYN),
    "sending beyond the window": b"".join(
        [packet(Kind.MSG, 1, msg_header(1024 * 1024), FLAG_SYN)]
        + [packet(Kind.DATA, 1, b"z" * 256 * 1024)] * 5
    ),
}


@pytest.mark.parametrize("case", MALFORMED_PACKETS)
async def test_malformed_packet_disconnects_only_the_offender(
    plaintext_target: Target, case: str
) -> None:
    target = plaintext_target
    client = TcpTransport(Credentials.generate(), TcpOptions(encrypt=False))
    try:
        good = await client.connect(target.address)
        reader, writer = await _handshaken(target)
        writer.write(MALFORMED_PACKETS[case])
        await _assert_disconnected(reader, writer)
        await _assert_serving(target, good)
    finally:
        await client.aclose()


async def test_truncated_packet_then_hangup_is_cleaned_up(plaintext_target: Target) -> None:
    target = plaintext_target
    reader, writer = await _handshaken(target)
    whole = packet(Kind.MSG, 1, msg_header(100) + b"x" * 100, FLAG_SYN)
    writer.write(whole[:50])
    await writer.drain()
    writer.close()
    client = TcpTransport(Credentials.generate(), TcpOptions(encrypt=False))
    try:
        await _assert_serving(target, await client.connect(target.address))
    finally:
        await client.aclose()


GARBAGE_HANDSHAKES = {
    "nothing": b"",
    "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "wrong magic": b"NOTSTAMEN" + bytes(40),
    "short hello": b"STAMEN\x00\x01\x01",
    "zeros": bytes(4096),
}


@pytest.mark.parametrize("case", GARBAGE_HANDSHAKES)
async def test_garbage_handshake_is_refused(target: Target, case: str) -> None:
    client = TcpTransport(Credentials.generate(), TcpOptions(encrypt=target.encrypt))
    try:
        good = await client.connect(target.address)
        reader, writer = await asyncio.open_connection(target.host, target.port)
        writer.write(GARBAGE_HANDSHAKES[case])
        await _assert_disconnected(reader, writer)
        await _assert_serving(target, good)
    finally:
        await client.aclose()


async def test_forged_records_after_an_encrypted_handshake(encrypted_target: Target) -> None:
    target = encrypted_target
    client = TcpTransport(Credentials.generate())
    try:
        good = await client.connect(target.address)
        for forged in (
            RECORD_PREFIX.pack(U64_MAX),
            RECORD_PREFIX.pack(64) + os.urandom(64),
            RECORD_PREFIX.pack(3) + b"abc",
        ):
            reader, writer = await asyncio.open_connection(target.host, target.port)
            await handshake(
                reader,
                writer,
                credentials=Credentials.generate(),
                is_dialer=True,
                encrypt=True,
                limits=LIMITS,
                window_bytes=1024 * 1024,
            )
            writer.write(forged)
            await _assert_disconnected(reader, writer)
        await _assert_serving(target, good)
    finally:
        await client.aclose()


@st.composite
def packet_soup(draw: st.DrawFn) -> bytes:
    """Packets with plausible headers and arbitrary fields, or plain noise."""
    pieces = []
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.booleans()):
            pieces.append(draw(st.binary(max_size=64)))
            continue
        kind = draw(st.sampled_from([*ALL_KINDS, 0, 99]))
        stream_id = draw(st.sampled_from([0, 1, 2, 3, 2**32 - 1]))
        payload = draw(st.binary(max_size=48))
        length = draw(st.sampled_from([-1, -1, 0, 2**32, U64_MAX]))
        flags = draw(st.sampled_from([0, FLAG_SYN, 0xFF]))
        pieces.append(packet(int(kind), stream_id, payload, flags, length))
    return b"".join(pieces)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(soup=packet_soup())
def test_arbitrary_packets_never_hurt_the_listener(soup: bytes) -> None:
    """Whatever arrives after a handshake, memory stays bounded and service goes on."""

    async def scenario() -> None:
        target = await _start_target(encrypt=False)
        transport = target.transport
        client = TcpTransport(Credentials.generate(), TcpOptions(encrypt=False))
        try:
            good = await client.connect(target.address)
            reader, writer = await _handshaken(target)
            writer.write(soup)
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.close()
            await _assert_serving(target, good)
        finally:
            await client.aclose()
            await transport.aclose()

    tracemalloc.start()
    try:
        asyncio.run(scenario())
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_bytes < 16 * 1024 * 1024, f"peak {peak_bytes} bytes for {len(soup)} hostile bytes"


def test_packet_helper_matches_the_wire_format() -> None:
    raw = packet(Kind.PING, 0, bytes(8))
    assert struct.unpack_from("!BBHIQ", raw) == (Kind.PING, 0, 0, 0, 8)
