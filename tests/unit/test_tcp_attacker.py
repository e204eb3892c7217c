"""An active attacker on the wire between two tcp peers, after an honest handshake.

The relay lets the handshake through untouched, then cuts each direction into records
(`u64 length | sealed`) and tampers with one: flips a bit (in the length, the ciphertext
or the tag), drops it, swaps it with the next, sends it twice, or injects bytes before it.
Whichever direction it attacks, the connection closes and the application never sees an
altered or injected message: each side receives an unaltered prefix of what was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from stamen.transports.base import Connection, Credentials, TransportError
from stamen.transports.handshake import CONFIRM, IDENTITY, PREAMBLE, RECORD_PREFIX, TAG_BYTES
from stamen.transports.tcp import TcpOptions, TcpTransport, parse_address

# What each direction carries before its first record (see test_tcp_handshake.py).
DIALER_HANDSHAKE_BYTES = len(PREAMBLE) + 2 + (32 + 16) + 2 + (48 + IDENTITY.size + 16)
LISTENER_HANDSHAKE_BYTES = (
    len(PREAMBLE) + 2 + (32 + 48 + IDENTITY.size + 16) + RECORD_PREFIX.size + len(CONFIRM) + 16
)
ATTACKED_RECORD = 6  # after a few messages went through, with plenty of traffic to follow
MESSAGES = [[index.to_bytes(4, "big"), os.urandom(100 + 37 * index)] for index in range(40)]
# A dropped record, or one whose length grew, shows at the next record: with round trips
# that is the next keepalive ping, so pings come often here.
OPTIONS = TcpOptions(handshake_timeout_s=1.0, keepalive_interval_s=0.05, keepalive_timeout_s=1.0)
CLOSE_TIMEOUT_S = 5.0

Attack = Callable[[bytes, bytes], list[bytes]]  # (this record, the next) -> what is sent


def _flip(position: int) -> Attack:
    def attack(record: bytes, _: bytes) -> list[bytes]:
        altered = bytearray(record)
        altered[position % len(altered)] ^= 0x01
        return [bytes(altered)]

    return attack


ATTACKS: dict[str, tuple[Attack, bool]] = {  # name -> (attack, consumes the next record)
    "flip a length bit": (_flip(RECORD_PREFIX.size - 1), False),
    "flip a ciphertext bit": (_flip(RECORD_PREFIX.size + 3), False),
    "flip a tag bit": (_flip(-TAG_BYTES // 2), False),
    "drop": (lambda record, _: [], False),
    "reorder": (lambda record, following: [following, record], True),
    "replay": (lambda record, _: [record, record], False),
    "inject random bytes": (lambda record, _: [os.urandom(40), record], False),
    "inject a forged record": (
        lambda record, _: [RECORD_PREFIX.pack(64) + os.urandom(64), record],
        False,
    ),
}


class TamperingRelay:
    """Forwards one direction, applying `attack` to record number `ATTACKED_RECORD`."""

    def __init__(self, handshake_bytes: int, attack: Attack | None, takes_next: bool) -> None:
        self.handshake_bytes = handshake_bytes
        self.attack, self.takes_next = attack, takes_next
        self.attacked = False

    async def pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            await self._forward_handshake(source, sink)
            index = 0
            while True:
                record = await self._read_record(source)
                if self.attack is None or index != ATTACKED_RECORD:
                    sink.write(record)
                else:
                    following = await self._read_record(source) if self.takes_next else b""
                    for piece in self.attack(record, following):
                        sink.write(piece)
                    self.attacked = True
                index += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            sink.close()

    async def _forward_handshake(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter
    ) -> None:
        """As it comes: each side waits for the other's handshake messages."""
        left = self.handshake_bytes
        while left:
            chunk = await source.read(left)
            if not chunk:
                raise asyncio.IncompleteReadError(b"", left)
            sink.write(chunk)
            left -= len(chunk)

    @staticmethod
    async def _read_record(source: asyncio.StreamReader) -> bytes:
        prefix = await source.readexactly(RECORD_PREFIX.size)
        (sealed_bytes,) = RECORD_PREFIX.unpack(prefix)
        return prefix + await source.readexactly(sealed_bytes)


@dataclass
class Observed:
    server_received: list[list[bytes]] = field(default_factory=list)
    client_received: list[list[bytes]] = field(default_factory=list)
    server_error: BaseException | None = None
    client_error: BaseException | None = None


async def _run(attack_to_listener: TamperingRelay, attack_to_dialer: TamperingRelay) -> Observed:
    observed = Observed()
    server_done = asyncio.Event()

    async def echo(connection: Connection) -> None:
        try:
            stream = await connection.accept_stream()
            while True:
                message = await stream.recv()
                observed.server_received.append(message)
                await stream.send(message)
        except TransportError as exc:
            observed.server_error = exc
        finally:
            server_done.set()

    server = TcpTransport(Credentials.generate(), OPTIONS)
    listener = await server.listen("tcp://127.0.0.1:0", echo)

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*parse_address(listener.addresses[0]))
        await asyncio.gather(
            attack_to_listener.pipe(reader, up_writer), attack_to_dialer.pipe(up_reader, writer)
        )

    proxy = await asyncio.start_server(relay, "127.0.0.1", 0)
    client = TcpTransport(Credentials.generate(), OPTIONS)
    try:
        connection = await client.connect(f"tcp://127.0.0.1:{proxy.sockets[0].getsockname()[1]}")
        stream = await connection.open_stream()
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            try:  # round trips, so that messages are delivered before the attack
                for message in MESSAGES:
                    await stream.send(message)
                    observed.client_received.append(await stream.recv())
            except TransportError as exc:
                observed.client_error = exc
            await server_done.wait()
            await _closed(connection)
    finally:
        await client.aclose()
        await server.aclose()
        proxy.close()
    return observed


async def _closed(connection: Connection) -> None:
    """Wait until the dialer's side of the connection is down too."""
    with contextlib.suppress(TransportError):
        await connection.accept_stream()  # returns only with ConnectionClosed here
    assert connection.is_closed


def _assert_unaltered_prefix(received: list[list[bytes]]) -> None:
    assert received == MESSAGES[: len(received)]


async def test_the_relay_without_an_attack_delivers_everything() -> None:
    """The harness itself: with nothing altered every message comes back (so a closed
    connection below is the attack's doing)."""
    observed = Observed()
    server = TcpTransport(Credentials.generate(), OPTIONS)

    async def echo(connection: Connection) -> None:
        stream = await connection.accept_stream()
        for _ in MESSAGES:
            await stream.send(await stream.recv())

    listener = await server.listen("tcp://127.0.0.1:0", echo)
    upward = TamperingRelay(DIALER_HANDSHAKE_BYTES, None, False)
    downward = TamperingRelay(LISTENER_HANDSHAKE_BYTES, None, False)

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*parse_address(listener.addresses[0]))
        await asyncio.gather(upward.pipe(reader, up_writer), downward.pipe(up_reader, writer))

    proxy = await asyncio.start_server(relay, "127.0.0.1", 0)
    client = TcpTransport(Credentials.generate(), OPTIONS)
    try:
        connection = await client.connect(f"tcp://127.0.0.1:{proxy.sockets[0].getsockname()[1]}")
        stream = await connection.open_stream()
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            for message in MESSAGES:
                await stream.send(message)
            for _ in MESSAGES:
                observed.client_received.append(await stream.recv())
    finally:
        await client.aclose()
        await server.aclose()
        proxy.close()
    assert observed.client_received == MESSAGES


@pytest.mark.parametrize("to_listener", [True, False], ids=["to-listener", "to-dialer"])
@pytest.mark.parametrize("attack", ATTACKS)
async def test_a_tampered_record_closes_the_connection_unharmed(
    attack: str, to_listener: bool
) -> None:
    action, takes_next = ATTACKS[attack]
    attacked = TamperingRelay(
        DIALER_HANDSHAKE_BYTES if to_listener else LISTENER_HANDSHAKE_BYTES, action, takes_next
    )
    honest = TamperingRelay(
        LISTENER_HANDSHAKE_BYTES if to_listener else DIALER_HANDSHAKE_BYTES, None, False
    )
    if to_listener:
        observed = await _run(attacked, honest)
    else:
        observed = await _run(honest, attacked)
    assert attacked.attacked
    _assert_unaltered_prefix(observed.server_received)
    _assert_unaltered_prefix(observed.client_received)
    # What came before the attack was delivered, nothing after it.
    assert 0 < len(observed.client_received) < len(MESSAGES)
    assert len(observed.server_received) < len(MESSAGES)
    assert observed.server_error is not None
    assert observed.client_error is not None
