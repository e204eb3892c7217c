"""Hostile bytes at a tcp listener: garbage handshakes, and malformed, truncated and
oversized packets after a real handshake (sealed as valid records, so that they reach the
packet parser). Each offender is disconnected, nothing absurd is allocated, and the
listener keeps serving a well-behaved client throughout."""

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
from stamen.transports.handshake import RECORD_PREFIX, RecordCipher, handshake
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


async def _start_target() -> Target:
    options = TcpOptions(limits=LIMITS, handshake_timeout_s=0.5)
    transport = TcpTransport(Credentials.generate(), options)
    listener = await transport.listen("tcp://127.0.0.1:0", echo_handler)
    host, port = parse_address(listener.addresses[0])
    return Target(transport, host, port, listener.addresses[0])


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    started = await _start_target()
    yield started
    await started.transport.aclose()


@dataclass
class RawPeer:
    """A raw socket that completed a real handshake, with its sending cipher."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    cipher: RecordCipher

    def send_records(self, packets: list[bytes]) -> None:
        """Each packet sealed as one valid record."""
        for packet_bytes in packets:
            self.writer.write(self.cipher.seal(packet_bytes))


async def _handshaken(target: Target) -> RawPeer:
    reader, writer = await asyncio.open_connection(target.host, target.port)
    result = await handshake(
        reader,
        writer,
        credentials=Credentials.generate(),
        is_dialer=True,
        limits=LIMITS,
        window_bytes=1024 * 1024,
    )
    return RawPeer(reader, writer, result.send_cipher)


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
    client = TcpTransport(Credentials.generate())
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
    "u64 max length": [packet(Kind.MSG, 1, flags=FLAG_SYN, length=U64_MAX)],
    "length just over the limit": [packet(Kind.DATA, 1, flags=FLAG_SYN, length=2**20)],
    "u32 max frame count": [packet(Kind.MSG, 1, msg_header(count=2**32 - 1), FLAG_SYN)],
    "too many frames": [packet(Kind.MSG, 1, msg_header(*[1] * 9), FLAG_SYN)],
    "u64 max frame size": [packet(Kind.MSG, 1, msg_header(U64_MAX), FLAG_SYN)],
    "frame sizes over the message limit": [
        packet(Kind.MSG, 1, msg_header(2**19, 2**19 + 1), FLAG_SYN)
    ],
    "truncated message header": [packet(Kind.MSG, 1, b"\x00\x00", FLAG_SYN)],
    "data beyond the declared size": [packet(Kind.MSG, 1, msg_header(1) + b"xy", FLAG_SYN)],
    "data for a never-opened stream": [packet(Kind.DATA, 77, b"x")],
    "stream id of the wrong parity": [packet(Kind.MSG, 2, msg_header(1) + b"x", FLAG_SYN)],
    "stream 0": [packet(Kind.MSG, 0, msg_header(1) + b"x", FLAG_SYN)],
    "unknown packet type": [packet(200, 0)],
    "unknown flags": [packet(Kind.PING, 0, bytes(8), flags=0x80)],
    "reserved bits set": [PACKET.pack(Kind.PING, 0, 1, 0, 8) + bytes(8)],
    "window overflow": [packet(Kind.WINDOW, 1, WINDOW.pack(U64_MAX), FLAG_SYN)],
    "malformed ping": [packet(Kind.PING, 0, b"\x01")],
    "data outside a message": [packet(Kind.DATA, 1, b"x", FLAG_SYN)],
    "two packets in one record": [packet(Kind.PING, 0, bytes(8)) * 2],
    "sending beyond the window": [packet(Kind.MSG, 1, msg_header(1024 * 1024), FLAG_SYN)]
    + [packet(Kind.DATA, 1, b"z" * 256 * 1024)] * 5,
}


@pytest.mark.parametrize("case", MALFORMED_PACKETS)
async def test_malformed_packet_disconnects_only_the_offender(target: Target, case: str) -> None:
    client = TcpTransport(Credentials.generate())
    try:
        good = await client.connect(target.address)
        peer = await _handshaken(target)
        peer.send_records(MALFORMED_PACKETS[case])
        await _assert_disconnected(peer.reader, peer.writer)
        await _assert_serving(target, good)
    finally:
        await client.aclose()


async def test_truncated_record_then_hangup_is_cleaned_up(target: Target) -> None:
    peer = await _handshaken(target)
    whole = peer.cipher.seal(packet(Kind.MSG, 1, msg_header(100) + b"x" * 100, FLAG_SYN))
    peer.writer.write(bytes(whole)[:50])
    await peer.writer.drain()
    peer.writer.close()
    client = TcpTransport(Credentials.generate())
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
    "preamble, then an oversized message": b"STAMEN\x00\x03\xff\xff" + bytes(100),
    "preamble, then a short message": b"STAMEN\x00\x03\x00\x05abcde",
}


@pytest.mark.parametrize("case", GARBAGE_HANDSHAKES)
async def test_garbage_handshake_is_refused(target: Target, case: str) -> None:
    client = TcpTransport(Credentials.generate())
    try:
        good = await client.connect(target.address)
        reader, writer = await asyncio.open_connection(target.host, target.port)
        writer.write(GARBAGE_HANDSHAKES[case])
        await _assert_disconnected(reader, writer)
        await _assert_serving(target, good)
    finally:
        await client.aclose()


async def test_forged_records_after_a_handshake(target: Target) -> None:
    client = TcpTransport(Credentials.generate())
    try:
        good = await client.connect(target.address)
        for forged in (
            RECORD_PREFIX.pack(U64_MAX),
            RECORD_PREFIX.pack(64) + os.urandom(64),
            RECORD_PREFIX.pack(3) + b"abc",
        ):
            peer = await _handshaken(target)
            peer.writer.write(forged)
            await _assert_disconnected(peer.reader, peer.writer)
        await _assert_serving(target, good)
    finally:
        await client.aclose()


@st.composite
def packet_soup(draw: st.DrawFn) -> list[bytes]:
    """Packets with plausible headers and arbitrary fields, or plain noise (one record
    each)."""
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
    return pieces


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(soup=packet_soup())
def test_arbitrary_packets_never_hurt_the_listener(soup: list[bytes]) -> None:
    """Whatever arrives after a handshake, memory stays bounded and service goes on."""

    async def scenario() -> None:
        target = await _start_target()
        transport = target.transport
        client = TcpTransport(Credentials.generate())
        try:
            good = await client.connect(target.address)
            peer = await _handshaken(target)
            peer.send_records(soup)
            await peer.writer.drain()
            await asyncio.sleep(0.01)
            peer.writer.close()
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
    hostile_bytes = sum(len(piece) for piece in soup)
    assert peak_bytes < 16 * 1024 * 1024, f"peak {peak_bytes} bytes for {hostile_bytes} hostile"


def test_packet_helper_matches_the_wire_format() -> None:
    raw = packet(Kind.PING, 0, bytes(8))
    assert struct.unpack_from("!BBHIQ", raw) == (Kind.PING, 0, 0, 0, 8)
