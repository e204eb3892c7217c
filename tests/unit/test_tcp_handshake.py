"""The tcp handshake under attack: wrong swarm keys, impostors, replays, truncated and
altered handshake bytes, and peers of the old version all fail with typed errors, while
the listener keeps accepting honest peers. Also the record cipher's rekeying."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from stamen.transports import handshake as handshake_module
from stamen.transports.base import (
    Connection,
    Credentials,
    HandshakeError,
    IdentityMismatch,
    Limits,
    TransportError,
)
from stamen.transports.handshake import (
    CONFIRM,
    IDENTITY,
    MESSAGE_LENGTH,
    NOISE_PROTOCOL,
    PREAMBLE,
    PROLOGUE,
    ROLE_DIALER,
    ROLE_LISTENER,
    SIGNATURE_CONTEXT,
    RecordCipher,
    swarm_psk,
)
from stamen.transports.noise import CIPHERS, CipherState, HandshakeState, public_bytes
from stamen.transports.tcp import TcpOptions, TcpTransport, parse_address

OLD_V2_HELLO = b"STAMEN\x00\x02" + b"\x01" + os.urandom(32)  # what the previous release sent
FAST = TcpOptions(handshake_timeout_s=0.5)
LIMITS = Limits()
WINDOW_BYTES = 4 * 1024 * 1024
# Sizes on the wire: e (+ the tag psk mode adds), e + sealed s + payload, sealed s + payload.
MESSAGE_1_BYTES = 32 + 16
MESSAGE_2_BYTES = 32 + 48 + IDENTITY.size + 16
MESSAGE_3_BYTES = 48 + IDENTITY.size + 16
DIALER_HANDSHAKE_BYTES = len(PREAMBLE) + 2 + MESSAGE_1_BYTES + 2 + MESSAGE_3_BYTES
LISTENER_ANSWER_BYTES = len(PREAMBLE) + 2 + MESSAGE_2_BYTES
CONFIRM_RECORD_BYTES = 8 + len(CONFIRM) + 16


@dataclass
class Server:
    transport: TcpTransport
    address: str
    accepted: list[Connection] = field(default_factory=list)

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_address(self.address)


async def _start(credentials: Credentials | None = None) -> Server:
    transport = TcpTransport(credentials or Credentials.generate(), FAST)
    server = Server(transport, "")

    async def handler(connection: Connection) -> None:
        server.accepted.append(connection)
        try:
            stream = await connection.accept_stream()
            while True:
                await stream.send(await stream.recv())
        except TransportError:
            pass

    listener = await transport.listen("tcp://127.0.0.1:0", handler)
    server.address = listener.addresses[0]
    return server


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    started = await _start()
    yield started
    await started.transport.aclose()


async def _assert_serving(server: Server, credentials: Credentials | None = None) -> None:
    """An honest peer still gets through and is echoed."""
    client = TcpTransport(credentials or Credentials.generate(), FAST)
    try:
        connection = await client.connect(server.address)
        stream = await connection.open_stream()
        await stream.send([b"hello"])
        assert await stream.recv() == [b"hello"]
    finally:
        await client.aclose()


async def _hung_up(reader: asyncio.StreamReader) -> bytes:
    """Everything the peer sent until it hung up."""
    received = bytearray()
    try:
        async with asyncio.timeout(2.0):
            while chunk := await reader.read(65536):
                received += chunk
    except ConnectionError:
        pass
    return bytes(received)


# --- a hand-driven Noise peer, to speak the protocol wrongly on purpose --------------------


def _noise(initiator: bool, swarm_key: bytes | None = None) -> tuple[HandshakeState, bytes]:
    static = X25519PrivateKey.generate()
    state = HandshakeState(
        NOISE_PROTOCOL,
        initiator=initiator,
        prologue=PROLOGUE,
        static_key=static,
        psks=[swarm_psk(swarm_key)],
    )
    return state, public_bytes(static)


def _payload(signer: Credentials, role: bytes, signed_static: bytes, key: bytes = b"") -> bytes:
    """An identity payload claiming `key` (default: the signer's), signed over
    `signed_static`."""
    signature = signer.private_key.sign(SIGNATURE_CONTEXT + role + signed_static)
    claimed = key or signer.public_key
    return IDENTITY.pack(claimed, signature, 64, 2**20, 16, WINDOW_BYTES)


def _framed(message: bytes) -> bytes:
    return MESSAGE_LENGTH.pack(len(message)) + message


async def _read_framed(reader: asyncio.StreamReader) -> bytes:
    (length,) = MESSAGE_LENGTH.unpack(await reader.readexactly(2))
    return await reader.readexactly(length)


async def _fake_listener(
    respond: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> tuple[asyncio.Server, str]:
    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await respond(reader, writer)
        finally:
            writer.close()

    fake = await asyncio.start_server(run, "127.0.0.1", 0)
    return fake, f"tcp://127.0.0.1:{fake.sockets[0].getsockname()[1]}"


# --- swarm keys ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server_key", "client_key"),
    [(b"k" * 32, b"x" * 32), (b"k" * 32, None), (None, b"k" * 32)],
    ids=["different", "client-has-none", "server-has-none"],
)
async def test_a_wrong_swarm_key_fails_both_sides(
    server_key: bytes | None, client_key: bytes | None, caplog: pytest.LogCaptureFixture
) -> None:
    server = await _start(Credentials.generate(server_key))
    client = TcpTransport(Credentials.generate(client_key), FAST)
    try:
        with caplog.at_level(logging.INFO, logger="stamen.transports.tcp"):
            with pytest.raises(HandshakeError):
                await client.connect(server.address)
            await asyncio.sleep(0.05)
        assert not server.accepted
        assert "swarm key" in caplog.text
        await _assert_serving(server, Credentials.generate(server_key))
    finally:
        await client.aclose()
        await server.transport.aclose()


async def test_the_same_swarm_key_connects() -> None:
    server = await _start(Credentials.generate(b"secret"))
    try:
        await _assert_serving(server, Credentials.generate(b"secret"))
    finally:
        await server.transport.aclose()


# --- identities ----------------------------------------------------------------------------


async def test_a_dialer_claiming_another_peers_key_is_refused(server: Server) -> None:
    """The impostor has the victim's public key and a real signature of the victim, made
    over another Noise static key (say, recorded from another connection)."""
    victim = Credentials.generate()
    reader, writer = await asyncio.open_connection(*server.host_port)
    state, _ = _noise(initiator=True)
    writer.write(PREAMBLE + _framed(state.write_message(b"")))
    assert await reader.readexactly(len(PREAMBLE)) == PREAMBLE
    state.read_message(await _read_framed(reader))
    victims_other_static = public_bytes(X25519PrivateKey.generate())
    forged = _payload(victim, ROLE_DIALER, victims_other_static)
    writer.write(_framed(state.write_message(forged)))
    assert await _hung_up(reader) == b""  # no confirmation record
    writer.close()
    assert not server.accepted
    await _assert_serving(server)


async def test_a_signature_made_for_the_other_role_is_refused(server: Server) -> None:
    """A listener's signature (role L) over this very static key does not pass as a
    dialer's: a reflected payload is useless."""
    impostor = Credentials.generate()
    reader, writer = await asyncio.open_connection(*server.host_port)
    state, static_public = _noise(initiator=True)
    writer.write(PREAMBLE + _framed(state.write_message(b"")))
    await reader.readexactly(len(PREAMBLE))
    state.read_message(await _read_framed(reader))
    writer.write(_framed(state.write_message(_payload(impostor, ROLE_LISTENER, static_public))))
    assert await _hung_up(reader) == b""
    writer.close()
    assert not server.accepted


async def test_the_dialer_checks_the_listener_before_revealing_itself() -> None:
    """A listener whose signature covers another static key gets `HandshakeError`, and
    never sees message 3 (which would carry the dialer's identity)."""
    victim = Credentials.generate()
    seen_after_message_2: list[bytes] = []

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(PREAMBLE))
        state, _ = _noise(initiator=False)
        state.read_message(await _read_framed(reader))
        other_static = public_bytes(X25519PrivateKey.generate())
        forged = _payload(victim, ROLE_LISTENER, other_static)
        writer.write(PREAMBLE + _framed(state.write_message(forged)))
        seen_after_message_2.append(await _hung_up(reader))

    fake, address = await _fake_listener(impostor)
    client = TcpTransport(Credentials.generate(), FAST)
    try:
        with pytest.raises(HandshakeError, match="signature"):
            await client.connect(address, expected_public_key=victim.public_key)
        await asyncio.sleep(0.05)
        assert seen_after_message_2 == [b""]
    finally:
        await client.aclose()
        fake.close()


async def test_an_unexpected_listener_key_is_an_identity_mismatch(server: Server) -> None:
    """An honest listener that is not the peer asked for: `IdentityMismatch`, and the
    listener never learns who dialed (no connection reaches its handler)."""
    client = TcpTransport(Credentials.generate(), FAST)
    try:
        with pytest.raises(IdentityMismatch):
            await client.connect(server.address, expected_public_key=os.urandom(32))
        await asyncio.sleep(0.05)
        assert not server.accepted
        expected = server.transport.credentials.public_key
        connection = await client.connect(server.address, expected_public_key=expected)
        assert connection.remote_public_key == expected
    finally:
        await client.aclose()


# --- replays, truncation, altered bytes -----------------------------------------------------


async def _recorded_dialer_bytes(server: Server) -> bytes:
    """What an honest dialer sent during one real handshake (through a recording relay)."""
    sent = bytearray()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*server.host_port)

        async def upstream() -> None:
            while chunk := await reader.read(65536):
                sent.extend(chunk)
                up_writer.write(chunk)
            up_writer.close()

        async def downstream() -> None:
            while chunk := await up_reader.read(65536):
                writer.write(chunk)
            writer.close()

        await asyncio.gather(upstream(), downstream(), return_exceptions=True)

    proxy = await asyncio.start_server(relay, "127.0.0.1", 0)
    client = TcpTransport(Credentials.generate(), FAST)
    try:
        port = proxy.sockets[0].getsockname()[1]
        await client.connect(f"tcp://127.0.0.1:{port}")
    finally:
        await client.aclose()
        proxy.close()
    return bytes(sent[:DIALER_HANDSHAKE_BYTES])


async def test_a_replayed_handshake_is_refused(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    recorded = await _recorded_dialer_bytes(server)
    assert len(server.accepted) == 1
    reader, writer = await asyncio.open_connection(*server.host_port)
    with caplog.at_level(logging.INFO, logger="stamen.transports.tcp"):
        writer.write(recorded)  # message 3 belongs to the old listener's ephemeral key
        received = await _hung_up(reader)
    writer.close()
    assert received.startswith(PREAMBLE)  # message 2 came, fresh, but no confirmation
    assert len(received) == LISTENER_ANSWER_BYTES
    assert "message 3 did not decrypt" in caplog.text  # refused at once, not timed out
    assert len(server.accepted) == 1
    await _assert_serving(server)


async def test_truncated_handshakes_are_refused(server: Server) -> None:
    recorded = await _recorded_dialer_bytes(server)
    for cut in (1, len(PREAMBLE), len(PREAMBLE) + 1, len(PREAMBLE) + 20, len(recorded) - 1):
        reader, writer = await asyncio.open_connection(*server.host_port)
        writer.write(recorded[:cut])
        writer.write_eof()
        await _hung_up(reader)
        writer.close()
    assert len(server.accepted) == 1
    await _assert_serving(server)


def _truncated_answer(
    cut: int,
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(PREAMBLE))
        state, static_public = _noise(initiator=False)
        state.read_message(await _read_framed(reader))
        payload = _payload(Credentials.generate(), ROLE_LISTENER, static_public)
        writer.write((PREAMBLE + _framed(state.write_message(payload)))[:cut])

    return respond


async def test_a_dialer_facing_a_truncated_answer_fails() -> None:
    for cut in (0, 4, len(PREAMBLE), len(PREAMBLE) + 40, LISTENER_ANSWER_BYTES - 1):
        fake, address = await _fake_listener(_truncated_answer(cut))
        client = TcpTransport(Credentials.generate(), FAST)
        try:
            with pytest.raises(HandshakeError):
                await client.connect(address)
        finally:
            await client.aclose()
            fake.close()


class BitFlipper:
    """A relay that flips one bit at byte `position` of one direction's stream."""

    def __init__(self, target: tuple[str, int], position: int, to_listener: bool) -> None:
        self.target, self.position, self.to_listener = target, position, to_listener

    async def relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pipe(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, flip: bool
        ) -> None:
            offset = 0
            while chunk := await source.read(65536):
                data = bytearray(chunk)
                if flip and offset <= self.position < offset + len(data):
                    data[self.position - offset] ^= 0x10
                offset += len(data)
                sink.write(bytes(data))
            sink.close()

        await asyncio.gather(
            pipe(reader, up_writer, self.to_listener),
            pipe(up_reader, writer, not self.to_listener),
            return_exceptions=True,
        )


# Positions in each direction's handshake bytes: preamble, length prefixes, keys, sealed
# static keys, payloads, tags; the listener's side ends with its confirmation record.
DIALER_POSITIONS = (0, 7, 9, 10, 30, 50, 57, 58, 59, 60, 90, 150, 200, DIALER_HANDSHAKE_BYTES - 1)
LISTENER_POSITIONS = (
    *(3, 7, 8, 11, 25, 45, 60, 100, 180, LISTENER_ANSWER_BYTES - 1),
    *(LISTENER_ANSWER_BYTES + 7, LISTENER_ANSWER_BYTES + 12),
    LISTENER_ANSWER_BYTES + CONFIRM_RECORD_BYTES - 1,
)


def test_the_flipped_positions_lie_inside_the_handshake() -> None:
    assert max(DIALER_POSITIONS) < DIALER_HANDSHAKE_BYTES
    assert max(LISTENER_POSITIONS) < LISTENER_ANSWER_BYTES + CONFIRM_RECORD_BYTES


@pytest.mark.parametrize(
    ("to_listener", "position"),
    [(True, position) for position in DIALER_POSITIONS]
    + [(False, position) for position in LISTENER_POSITIONS],
)
async def test_an_altered_handshake_byte_fails_the_dial(
    server: Server, to_listener: bool, position: int
) -> None:
    flipper = BitFlipper(server.host_port, position, to_listener)
    proxy = await asyncio.start_server(flipper.relay, "127.0.0.1", 0)
    client = TcpTransport(Credentials.generate(), TcpOptions(handshake_timeout_s=0.3))
    try:
        port = proxy.sockets[0].getsockname()[1]
        with pytest.raises(HandshakeError):
            await client.connect(f"tcp://127.0.0.1:{port}", timeout_s=0.3)
    finally:
        await client.aclose()
        proxy.close()
    if to_listener:
        await asyncio.sleep(0.05)
        assert not server.accepted
    await _assert_serving(server)


# --- versions ------------------------------------------------------------------------------


async def test_an_old_version_dialer_is_refused_by_name(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    reader, writer = await asyncio.open_connection(*server.host_port)
    with caplog.at_level(logging.INFO, logger="stamen.transports.tcp"):
        writer.write(OLD_V2_HELLO)
        answer = await _hung_up(reader)
        writer.close()
    assert "version 2; this is version 3" in caplog.text
    # The old dialer read a whole hello (41 bytes), so its magic check refuses us by name.
    assert len(answer) >= len(OLD_V2_HELLO) and answer[:8] == PREAMBLE != OLD_V2_HELLO[:8]
    await _assert_serving(server)


async def test_an_old_version_listener_is_refused_by_name() -> None:
    async def old_listener(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(OLD_V2_HELLO)
        await _hung_up(reader)

    fake, address = await _fake_listener(old_listener)
    client = TcpTransport(Credentials.generate(), FAST)
    try:
        with pytest.raises(HandshakeError, match="version 2; this is version 3"):
            await client.connect(address)
    finally:
        await client.aclose()
        fake.close()


async def test_an_old_listener_sees_a_magic_it_refuses() -> None:
    """The previous release read a 41-byte hello and compared its first 8 bytes with its
    magic: we send at least that much at once, starting with another magic."""
    first_bytes: list[bytes] = []

    async def old_listener(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first_bytes.append(await reader.readexactly(len(OLD_V2_HELLO)))

    fake, address = await _fake_listener(old_listener)
    client = TcpTransport(Credentials.generate(), FAST)
    try:
        with pytest.raises(HandshakeError):
            await client.connect(address)
    finally:
        await client.aclose()
        fake.close()
    assert first_bytes and first_bytes[0][:8] == PREAMBLE != OLD_V2_HELLO[:8]


# --- the record cipher ---------------------------------------------------------------------


def _cipher_pair(interval: int, other_interval: int) -> tuple[RecordCipher, RecordCipher]:
    key = os.urandom(32)
    sender = RecordCipher(CipherState(CIPHERS["AESGCM"], key), interval)
    receiver = RecordCipher(CipherState(CIPHERS["AESGCM"], key), other_interval)
    return sender, receiver


def _open(receiver: RecordCipher, record: bytes | memoryview) -> bytes:
    record = bytes(record)
    return receiver.open(record[:8], record[8:])


def test_records_survive_rekeying_at_the_same_count() -> None:
    sender, receiver = _cipher_pair(3, 3)
    for index in range(10):
        message = index.to_bytes(4, "big") * (1 + index * 5000)  # small and big records
        record = sender.seal_parts((message[:3], message[3:]), len(message))
        assert _open(receiver, record) == message


def test_rekeying_really_changes_the_key() -> None:
    sender, receiver = _cipher_pair(3, 4)  # the receiver would rekey one record late
    for index in range(3):
        assert _open(receiver, sender.seal(b"m%d" % index)) == b"m%d" % index
    with pytest.raises(InvalidTag):
        _open(receiver, sender.seal(b"after the rekey"))


async def test_a_connection_carries_on_across_many_rekeys(
    monkeypatch: pytest.MonkeyPatch, server: Server
) -> None:
    monkeypatch.setattr(handshake_module, "REKEY_INTERVAL_RECORDS", 4)
    client = TcpTransport(Credentials.generate(), FAST)
    try:
        connection = await client.connect(server.address)
        stream = await connection.open_stream()
        messages = [[os.urandom(size)] for size in (10, 70_000, 5, 300_000, 1, 20_000) * 3]
        for message in messages:
            await stream.send(message)
        for message in messages:
            assert await stream.recv() == message
    finally:
        await client.aclose()
